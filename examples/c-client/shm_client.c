/*
 * shm_client: one `infer` request to edged whose inputs lie in shared memory, from C, with libzmq
 * and msgpack-c only.
 *
 * Written from docs/PROTOCOL.md (§11 shared-memory regions, §4 requests, §5 replies). The
 * inputs are copied once into a sealed memfd, the region, which is handed to the daemon over
 * regions.sock (beside infer.sock) in SCM_RIGHTS; the request then says where each input lies
 * instead of carrying its bytes. With -o, the daemon writes that output into the region too,
 * after the inputs. A camera process would make the region once and fill it frame after frame.
 *
 *   shm_client [-e ENDPOINT] [-t TIMEOUT_MS] [-o OUTPUT:BYTES] MODEL NAME=DTYPE:SHAPE:FILE ...
 *
 * The output is edged_infer's: "model M version V trace T", then per output a line
 * "output NAME DTYPE SHAPE" and its values; stderr says which output came in the region.
 * ENDPOINT must be an ipc:// one. Exit status: 0 success, 1 no reply or a transport failure,
 * 2 a usage or input error, 3 an error reply ("CODE: message" on stderr).
 */
#define _GNU_SOURCE /* memfd_create, F_ADD_SEALS */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#define MAX_INPUTS 64
#define MAX_DIMS 8
#define ALIGN 64 /* where each tensor starts in the region: what the daemon's models read best */

enum { EXIT_NO_REPLY = 1, EXIT_USAGE = 2, EXIT_ERROR_REPLY = 3 };

struct dtype {
    const char *name;
    size_t size;
};

static const struct dtype DTYPES[] = {
    {"bool", 1},  {"int8", 1},   {"uint8", 1},  {"int16", 2},   {"uint16", 2},  {"int32", 4},
    {"uint32", 4}, {"int64", 8}, {"uint64", 8}, {"float16", 2}, {"float32", 4}, {"float64", 8},
};

struct tensor {
    char name[257];
    const struct dtype *dtype;
    uint64_t shape[MAX_DIMS];
    int ndim;
    unsigned char *data;
    size_t size;
    size_t offset; /* in the region */
};

/* A region: the memfd's mapping, and the token the daemon gave it. */
struct region {
    unsigned char *base;
    size_t size;
    char token[65];
    int channel; /* the regions.sock connection: closing it releases the region */
};

static void usage(void) {
    fprintf(stderr, "usage: shm_client [-e ENDPOINT] [-t TIMEOUT_MS] [-o OUTPUT:BYTES]\n"
                    "                  MODEL NAME=DTYPE:SHAPE:FILE ...\n");
}

static const struct dtype *find_dtype(const char *name, size_t len) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (strlen(DTYPES[i].name) == len && memcmp(DTYPES[i].name, name, len) == 0)
            return &DTYPES[i];
    return NULL;
}

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0, n;
    unsigned char *buf = malloc(cap);
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            unsigned char *bigger = realloc(buf, cap *= 2);
            if (!bigger) free(buf);
            buf = bigger;
        }
    }
    fclose(f);
    *size = len;
    return buf;
}

/* NAME=DTYPE:SHAPE:FILE, as edged_infer takes it; 0 on success, else a message on stderr. */
static int parse_input(char *spec, struct tensor *t) {
    char *eq = strchr(spec, '=');
    char *c1 = eq ? strchr(eq + 1, ':') : NULL;
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!eq || !c1 || !c2 || eq == spec || (size_t)(eq - spec) >= sizeof t->name) {
        fprintf(stderr, "shm_client: input '%s' is not NAME=DTYPE:SHAPE:FILE\n", spec);
        return -1;
    }
    memcpy(t->name, spec, (size_t)(eq - spec));
    t->name[eq - spec] = '\0';
    t->dtype = find_dtype(eq + 1, (size_t)(c1 - eq - 1));
    if (!t->dtype) {
        fprintf(stderr, "shm_client: %s: unknown dtype\n", t->name);
        return -1;
    }
    uint64_t elements = 1;
    for (char *p = c1 + 1; p < c2;) {
        char *end;
        errno = 0;
        unsigned long long d = strtoull(p, &end, 10);
        if (end == p || errno || t->ndim == MAX_DIMS || (end < c2 && *end != 'x')) {
            fprintf(stderr, "shm_client: %s: bad shape\n", t->name);
            return -1;
        }
        t->shape[t->ndim++] = d;
        elements *= d;
        p = end < c2 ? end + 1 : end;
    }
    t->data = read_file(c2 + 1, &t->size);
    if (!t->data || t->size != elements * t->dtype->size) {
        fprintf(stderr, "shm_client: %s: %s does not hold the shape's %" PRIu64 " bytes\n",
                t->name, c2 + 1, elements * t->dtype->size);
        return -1;
    }
    return 0;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

static const msgpack_object *get(const msgpack_object *o, const char *key) {
    if (!o || o->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object *k = &o->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key) &&
            memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
            return &o->via.map.ptr[i].val;
    }
    return NULL;
}

static int is_str(const msgpack_object *o) { return o && o->type == MSGPACK_OBJECT_STR; }

static int is_true(const msgpack_object *o) {
    return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
}

static void print_str(FILE *out, const msgpack_object *o) {
    if (is_str(o)) fwrite(o->via.str.ptr, 1, o->via.str.size, out);
    else fputs("?", out);
}

/* "CODE: message" of an error reply (or of an error answer on regions.sock) to stderr. */
static void print_error(const msgpack_object *error) {
    print_str(stderr, get(error, "code"));
    fputs(": ", stderr);
    print_str(stderr, get(error, "message"));
    fputs("\n", stderr);
}

/*
 * Make the region: a memfd of `size` bytes sealed against shrinking and growing, mapped here,
 * and registered on regions.sock (beside the ipc:// endpoint's socket file) for `routing_id`.
 * Returns 0, or an exit status after a message on stderr.
 */
static int make_region(const char *endpoint, const unsigned char *routing_id, size_t id_len,
                       size_t size, int timeout_ms, struct region *r) {
    const char *slash = strrchr(endpoint, '/');
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strncmp(endpoint, "ipc://", 6) != 0 || endpoint[6] == '@' || !slash ||
        (size_t)(slash - endpoint - 6) + sizeof "/regions.sock" > sizeof addr.sun_path) {
        fprintf(stderr, "shm_client: regions need an ipc:// endpoint, not %s\n", endpoint);
        return EXIT_USAGE;
    }
    snprintf(addr.sun_path, sizeof addr.sun_path, "%.*s/regions.sock", (int)(slash - endpoint - 6),
             endpoint + 6);

    int fd = memfd_create("edged:c-client", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        fprintf(stderr, "shm_client: memfd: %s\n", strerror(errno));
        return EXIT_USAGE;
    }
    r->size = size;
    r->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (r->base == MAP_FAILED) {
        fprintf(stderr, "shm_client: mmap: %s\n", strerror(errno));
        return EXIT_USAGE;
    }

    /* {"op": "register", "routing_id": <bin>, "name": "c-client"}, the memfd in SCM_RIGHTS */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    pack_str(&pk, "op");
    pack_str(&pk, "register");
    pack_str(&pk, "routing_id");
    msgpack_pack_bin(&pk, id_len);
    msgpack_pack_bin_body(&pk, routing_id, id_len);
    pack_str(&pk, "name");
    pack_str(&pk, "c-client");

    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control = {0};
    struct iovec iov = {.iov_base = sb.data, .iov_len = sb.size};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);

    /* SOCK_SEQPACKET: one message each way, and the daemon drops the region when it closes */
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char reply[4096];
    ssize_t n = -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) == 0 && sendmsg(sock, &msg, 0) >= 0)
        n = recv(sock, reply, sizeof reply, 0);
    msgpack_sbuffer_destroy(&sb);
    close(fd); /* the daemon has its own mapping now, and ours stays */
    if (n <= 0) {
        fprintf(stderr, "shm_client: %s: %s\n", addr.sun_path, n == 0 ? "closed" : strerror(errno));
        return EXIT_NO_REPLY;
    }
    r->channel = sock; /* kept open for as long as the region serves */

    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    int status = EXIT_NO_REPLY;
    if (msgpack_unpack_next(&up, reply, (size_t)n, NULL) == MSGPACK_UNPACK_SUCCESS) {
        const msgpack_object *token = get(&up.data, "region");
        if (!is_true(get(&up.data, "ok"))) {
            print_error(&up.data);
            status = EXIT_ERROR_REPLY;
        } else if (is_str(token) && token->via.str.size < sizeof r->token) {
            memcpy(r->token, token->via.str.ptr, token->via.str.size);
            r->token[token->via.str.size] = '\0';
            status = 0;
        }
    }
    msgpack_unpacked_destroy(&up);
    return status;
}

/* The infer header: every input by reference, and `output` (if any) placed at `out_offset`. */
static void pack_header(msgpack_sbuffer *sb, uint64_t id, const char *model,
                        const struct tensor *inputs, int n_inputs, const struct region *r,
                        const char *output, size_t out_offset) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5 + (output != NULL));
    pack_str(&pk, "v");
    msgpack_pack_uint8(&pk, 1);
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "op");
    pack_str(&pk, "infer");
    pack_str(&pk, "model");
    pack_str(&pk, model);
    pack_str(&pk, "inputs");
    msgpack_pack_array(&pk, (size_t)n_inputs);
    for (int i = 0; i < n_inputs; i++) {
        msgpack_pack_map(&pk, 5);
        pack_str(&pk, "name");
        pack_str(&pk, inputs[i].name);
        pack_str(&pk, "dtype");
        pack_str(&pk, inputs[i].dtype->name);
        pack_str(&pk, "shape");
        msgpack_pack_array(&pk, (size_t)inputs[i].ndim);
        for (int d = 0; d < inputs[i].ndim; d++) msgpack_pack_uint64(&pk, inputs[i].shape[d]);
        pack_str(&pk, "region");
        pack_str(&pk, r->token);
        pack_str(&pk, "offset");
        msgpack_pack_uint64(&pk, inputs[i].offset);
    }
    if (output) {
        pack_str(&pk, "outputs");
        msgpack_pack_map(&pk, 1);
        pack_str(&pk, output);
        msgpack_pack_map(&pk, 2);
        pack_str(&pk, "region");
        pack_str(&pk, r->token);
        pack_str(&pk, "offset");
        msgpack_pack_uint64(&pk, out_offset);
    }
}

static void print_element(const unsigned char *p, const struct dtype *dt) {
    uint64_t u = 0;
    for (size_t b = 0; b < dt->size; b++) u |= (uint64_t)p[b] << (8 * b);
    if (strcmp(dt->name, "float32") == 0) {
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, sizeof f);
        printf("%.9g", f);
    } else if (strcmp(dt->name, "float64") == 0) {
        double d;
        memcpy(&d, &u, sizeof d);
        printf("%.17g", d);
    } else if (dt->name[0] == 'i') {
        int shift = (int)(64 - 8 * dt->size);
        printf("%" PRId64, (int64_t)(u << shift) >> shift);
    } else {
        printf("%" PRIu64, u); /* float16 printed as its bits: this example does not decode it */
    }
}

/* One output, from its frame or from the region; 0 if its bytes are all there. */
static int print_output(const msgpack_object *desc, const unsigned char *data, size_t size) {
    const msgpack_object *name = get(desc, "name"), *dtype = get(desc, "dtype");
    const msgpack_object *shape = get(desc, "shape");
    const struct dtype *dt = is_str(dtype) ? find_dtype(dtype->via.str.ptr, dtype->via.str.size)
                                           : NULL;
    if (!is_str(name) || !dt || !shape || shape->type != MSGPACK_OBJECT_ARRAY) return -1;
    uint64_t elements = 1;
    printf("output ");
    print_str(stdout, name);
    printf(" %s ", dt->name);
    for (uint32_t d = 0; d < shape->via.array.size; d++) {
        if (shape->via.array.ptr[d].type != MSGPACK_OBJECT_POSITIVE_INTEGER) return -1;
        printf(d ? "x%" PRIu64 : "%" PRIu64, shape->via.array.ptr[d].via.u64);
        elements *= shape->via.array.ptr[d].via.u64;
    }
    printf("\n");
    if (elements * dt->size > size) return -1;
    for (uint64_t i = 0; i < elements; i++) {
        if (i) putchar(' ');
        print_element(data + i * dt->size, dt);
    }
    printf("\n");
    return 0;
}

static void drain(void *sock, int more) {
    while (more) {
        zmq_msg_t t;
        zmq_msg_init(&t);
        if (zmq_msg_recv(&t, sock, 0) < 0) return;
        more = zmq_msg_more(&t);
        zmq_msg_close(&t);
    }
}

/* The reply to `id`: outputs in frames are read from them, those in the region from there. */
static int receive_reply(void *sock, uint64_t id, const struct region *r) {
    for (;;) {
        zmq_msg_t hdr;
        zmq_msg_init(&hdr);
        if (zmq_msg_recv(&hdr, sock, 0) < 0) {
            fprintf(stderr, "shm_client: no reply: %s\n", zmq_strerror(zmq_errno()));
            return EXIT_NO_REPLY;
        }
        int more = zmq_msg_more(&hdr), status = -1;
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        const msgpack_object *h = NULL;
        if (msgpack_unpack_next(&up, zmq_msg_data(&hdr), zmq_msg_size(&hdr), NULL) ==
            MSGPACK_UNPACK_SUCCESS)
            h = &up.data;
        const msgpack_object *rid = get(h, "id");
        if (!rid || rid->type != MSGPACK_OBJECT_POSITIVE_INTEGER || rid->via.u64 != id) {
            drain(sock, more); /* a stale reply: not ours */
        } else if (!is_true(get(h, "ok"))) {
            print_error(get(h, "error"));
            drain(sock, more);
            status = EXIT_ERROR_REPLY;
        } else {
            const msgpack_object *version = get(h, "version"), *outputs = get(h, "outputs");
            printf("model ");
            print_str(stdout, get(h, "model"));
            printf(" version %" PRIu64 " trace ", version ? version->via.u64 : 0);
            print_str(stdout, get(h, "trace"));
            printf("\n");
            status = 0;
            uint32_t n = outputs && outputs->type == MSGPACK_OBJECT_ARRAY ? outputs->via.array.size
                                                                          : 0;
            for (uint32_t i = 0; i < n && status == 0; i++) {
                const msgpack_object *desc = &outputs->via.array.ptr[i];
                const msgpack_object *offset = get(desc, "offset");
                if (get(desc, "region")) { /* written into our region: no frame */
                    uint64_t at = offset ? offset->via.u64 : r->size;
                    fputs("shm_client: output ", stderr);
                    print_str(stderr, get(desc, "name"));
                    fprintf(stderr, " came in the region at offset %" PRIu64 "\n", at);
                    if (at > r->size || print_output(desc, r->base + at, r->size - at) != 0)
                        status = EXIT_NO_REPLY;
                    continue;
                }
                zmq_msg_t frame;
                zmq_msg_init(&frame);
                if (!more || zmq_msg_recv(&frame, sock, 0) < 0 ||
                    print_output(desc, zmq_msg_data(&frame), zmq_msg_size(&frame)) != 0)
                    status = EXIT_NO_REPLY;
                more = zmq_msg_more(&frame);
                zmq_msg_close(&frame);
            }
            if (status) fprintf(stderr, "shm_client: an output does not match its bytes\n");
            drain(sock, more);
        }
        msgpack_unpacked_destroy(&up);
        zmq_msg_close(&hdr);
        if (status >= 0) return status;
    }
}

int main(int argc, char **argv) {
    const char *endpoint = getenv("EDGED_SOCKET");
    const char *output = NULL;
    size_t output_bytes = 0;
    int timeout_ms = 5000, opt;
    while ((opt = getopt(argc, argv, "e:t:o:h")) != -1) {
        char *colon;
        switch (opt) {
        case 'e': endpoint = optarg; break;
        case 't': timeout_ms = atoi(optarg); break;
        case 'o':
            colon = strrchr(optarg, ':');
            if (!colon) {
                usage();
                return EXIT_USAGE;
            }
            *colon = '\0';
            output = optarg;
            output_bytes = strtoull(colon + 1, NULL, 10);
            break;
        default: usage(); return EXIT_USAGE;
        }
    }
    int n_inputs = argc - optind - 1;
    if (!endpoint || n_inputs < 0 || n_inputs > MAX_INPUTS) {
        usage();
        return EXIT_USAGE;
    }
    const char *model = argv[optind];
    static struct tensor inputs[MAX_INPUTS];
    size_t size = 0;
    for (int i = 0; i < n_inputs; i++) {
        if (parse_input(argv[optind + 1 + i], &inputs[i]) != 0) return EXIT_USAGE;
        inputs[i].offset = size;
        size += (inputs[i].size + ALIGN - 1) / ALIGN * ALIGN;
    }
    size_t out_offset = size;
    size += output_bytes;

    /* Our DEALER's routing id, chosen here so that the region can be registered for it: random,
     * and never starting with a 0 byte (libzmq keeps those for its own ids). */
    unsigned char routing_id[16];
    if (getrandom(routing_id, sizeof routing_id, 0) != sizeof routing_id) return EXIT_NO_REPLY;
    routing_id[0] |= 1;

    struct region r = {0};
    int status = make_region(endpoint, routing_id, sizeof routing_id, size ? size : 1, timeout_ms,
                             &r);
    if (status != 0) return status;
    for (int i = 0; i < n_inputs; i++) { /* a camera would write its frame here */
        memcpy(r.base + inputs[i].offset, inputs[i].data, inputs[i].size);
        free(inputs[i].data);
    }

    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    zmq_setsockopt(sock, ZMQ_ROUTING_ID, routing_id, sizeof routing_id); /* before connecting */
    if (zmq_connect(sock, endpoint) != 0) {
        fprintf(stderr, "shm_client: cannot connect to %s\n", endpoint);
        return EXIT_NO_REPLY;
    }
    uint64_t id = (uint64_t)getpid();
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_header(&sb, id, model, inputs, n_inputs, &r, output, out_offset);
    zmq_send(sock, sb.data, sb.size, 0); /* the header alone: no tensor frames */
    msgpack_sbuffer_destroy(&sb);
    status = receive_reply(sock, id, &r);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    close(r.channel); /* the daemon unmaps the region */
    return status;
}
