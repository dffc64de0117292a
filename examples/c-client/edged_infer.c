/*
 * edged_infer: one `infer` request to edged from C, with libzmq and msgpack-c only.
 *
 * Written from docs/PROTOCOL.md (§1 transport, §2 layout, §3 dtypes, §4 requests, §5 replies,
 * §7.2 stale replies, §8 errors). A sensor process would keep the socket open and loop; this
 * program sends one request so that it can be run, read and tested on its own.
 *
 *   edged_infer [-e ENDPOINT] [-t TIMEOUT_MS] [-d DEADLINE_MS] [-V VERSION] [-T TRACE]
 *               MODEL NAME=DTYPE:SHAPE:FILE ...
 *
 * SHAPE is dimensions joined by 'x' ("1x16"; "" for a 0-d tensor); FILE holds the tensor's raw
 * little-endian bytes, C order ("-" reads standard input). Output, one block per output tensor:
 *
 *   model demo version 1 trace 9ce4122b-2a
 *   output probs float32 1x4
 *   0.25 0.25 0.25 0.25
 *
 * Exit status: 0 success, 1 no reply (timeout) or transport failure, 2 usage or input file
 * error, 3 an error reply (its code and message go to stderr as "CODE: message").
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#define MAX_INPUTS 64 /* PROTOCOL §6: entries in `inputs` */
#define MAX_DIMS 8    /* PROTOCOL §6: dimensions per tensor */

enum { EXIT_NO_REPLY = 1, EXIT_USAGE = 2, EXIT_ERROR_REPLY = 3 };

struct dtype {
    const char *name;
    size_t size;
};

/* PROTOCOL §3, exactly these spellings */
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
};

static void usage(void) {
    fprintf(stderr,
            "usage: edged_infer [-e ENDPOINT] [-t TIMEOUT_MS] [-d DEADLINE_MS] [-V VERSION]\n"
            "                   [-T TRACE] MODEL NAME=DTYPE:SHAPE:FILE ...\n");
}

static const struct dtype *find_dtype(const char *name, size_t len) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (strlen(DTYPES[i].name) == len && memcmp(DTYPES[i].name, name, len) == 0)
            return &DTYPES[i];
    return NULL;
}

/* The whole of `path` ("-": standard input) in a malloc'd buffer. */
static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0;
    unsigned char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            unsigned char *bigger = realloc(buf, cap *= 2);
            if (!bigger) free(buf);
            buf = bigger;
        }
    }
    if (f != stdin) fclose(f);
    *size = len;
    return buf;
}

/* Parse NAME=DTYPE:SHAPE:FILE and read FILE; 0 on success, else a message on stderr. */
static int parse_input(char *spec, struct tensor *t) {
    char *eq = strchr(spec, '=');
    char *c1 = eq ? strchr(eq + 1, ':') : NULL;
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!eq || !c1 || !c2 || eq == spec || (size_t)(eq - spec) >= sizeof t->name) {
        fprintf(stderr, "edged_infer: input '%s' is not NAME=DTYPE:SHAPE:FILE\n", spec);
        return -1;
    }
    memcpy(t->name, spec, (size_t)(eq - spec));
    t->name[eq - spec] = '\0';
    t->dtype = find_dtype(eq + 1, (size_t)(c1 - eq - 1));
    if (!t->dtype) {
        fprintf(stderr, "edged_infer: %s: unknown dtype '%.*s'\n", t->name, (int)(c1 - eq - 1),
                eq + 1);
        return -1;
    }
    uint64_t elements = 1;
    t->ndim = 0;
    for (char *p = c1 + 1; p < c2;) {
        char *end;
        errno = 0;
        unsigned long long d = strtoull(p, &end, 10);
        if (end == p || errno || t->ndim == MAX_DIMS || (end < c2 && *end != 'x')) {
            fprintf(stderr, "edged_infer: %s: bad shape '%.*s'\n", t->name, (int)(c2 - c1 - 1),
                    c1 + 1);
            return -1;
        }
        t->shape[t->ndim++] = d;
        elements *= d;
        p = end < c2 ? end + 1 : end;
    }
    t->data = read_file(c2 + 1, &t->size);
    if (!t->data) {
        fprintf(stderr, "edged_infer: %s: cannot read %s: %s\n", t->name, c2 + 1, strerror(errno));
        return -1;
    }
    if (t->size != elements * t->dtype->size) {
        fprintf(stderr, "edged_infer: %s: %s holds %zu bytes, the shape needs %" PRIu64 "\n",
                t->name, c2 + 1, t->size, elements * t->dtype->size);
        return -1;
    }
    return 0;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

/* Frame 0 of an infer request (PROTOCOL §4.1); `version` < 0 and `deadline_ms` < 0 omit keys. */
static void pack_header(msgpack_sbuffer *sb, uint64_t id, const char *model, long version,
                        double deadline_ms, const char *trace, const struct tensor *inputs,
                        int n_inputs) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5 + (version >= 0) + (deadline_ms >= 0) + (trace != NULL));
    pack_str(&pk, "v");
    msgpack_pack_uint8(&pk, 1);
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "op");
    pack_str(&pk, "infer");
    pack_str(&pk, "model");
    pack_str(&pk, model);
    if (version >= 0) {
        pack_str(&pk, "version");
        msgpack_pack_int64(&pk, version);
    }
    if (deadline_ms >= 0) {
        pack_str(&pk, "deadline_ms");
        msgpack_pack_double(&pk, deadline_ms);
    }
    if (trace) {
        pack_str(&pk, "trace");
        pack_str(&pk, trace);
    }
    pack_str(&pk, "inputs");
    msgpack_pack_array(&pk, (size_t)n_inputs);
    for (int i = 0; i < n_inputs; i++) {
        msgpack_pack_map(&pk, 3);
        pack_str(&pk, "name");
        pack_str(&pk, inputs[i].name);
        pack_str(&pk, "dtype");
        pack_str(&pk, inputs[i].dtype->name);
        pack_str(&pk, "shape");
        msgpack_pack_array(&pk, (size_t)inputs[i].ndim);
        for (int d = 0; d < inputs[i].ndim; d++) msgpack_pack_uint64(&pk, inputs[i].shape[d]);
    }
}

/* The value of str key `key` in map `o`, or NULL. */
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

static void print_str(FILE *out, const msgpack_object *o) {
    if (is_str(o)) fwrite(o->via.str.ptr, 1, o->via.str.size, out);
    else fputs("?", out);
}

/* Half precision to float by hand: C has no portable float16 type. */
static double half_to_double(uint16_t h) {
    int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exponent == 0) return sign * mantissa * 0x1p-24;
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    return sign * (1.0 + mantissa / 1024.0) * (double)(1 << exponent) * 0x1p-15;
}

/* Little-endian element `i` of `frame`, printed; memcpy because frames have no alignment. */
static void print_element(const unsigned char *frame, size_t i, const struct dtype *dt) {
    const unsigned char *p = frame + i * dt->size;
    uint64_t u = 0;
    for (size_t b = 0; b < dt->size; b++) u |= (uint64_t)p[b] << (8 * b);
    const char *n = dt->name;
    if (strcmp(n, "float32") == 0) {
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, sizeof f);
        printf("%.9g", f);
    } else if (strcmp(n, "float64") == 0) {
        double d;
        memcpy(&d, &u, sizeof d);
        printf("%.17g", d);
    } else if (strcmp(n, "float16") == 0) {
        printf("%.5g", half_to_double((uint16_t)u));
    } else if (n[0] == 'i') { /* sign-extend int8 ... int64 */
        int shift = (int)(64 - 8 * dt->size);
        printf("%" PRId64, (int64_t)(u << shift) >> shift);
    } else {
        printf("%" PRIu64, u);
    }
}

/* Print one output: its description line and its values; 0 if the frame matches it. */
static int print_output(const msgpack_object *desc, zmq_msg_t *frame) {
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
        const msgpack_object *dim = &shape->via.array.ptr[d];
        if (dim->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return -1;
        printf(d ? "x%" PRIu64 : "%" PRIu64, dim->via.u64);
        elements *= dim->via.u64;
    }
    printf("\n");
    if (zmq_msg_size(frame) != elements * dt->size) return -1;
    for (uint64_t i = 0; i < elements; i++) {
        if (i) putchar(' ');
        print_element(zmq_msg_data(frame), i, dt);
    }
    printf("\n");
    return 0;
}

static void send_frame(void *sock, const void *data, size_t size, int more) {
    zmq_msg_t m;
    zmq_msg_init_size(&m, size);
    memcpy(zmq_msg_data(&m), data, size);
    if (zmq_msg_send(&m, sock, more ? ZMQ_SNDMORE : 0) < 0) zmq_msg_close(&m);
}

/* Receive and drop the rest of a multipart message. */
static void drain(void *sock, int more) {
    while (more) {
        zmq_msg_t t;
        zmq_msg_init(&t);
        if (zmq_msg_recv(&t, sock, 0) < 0) return;
        more = zmq_msg_more(&t);
        zmq_msg_close(&t);
    }
}

/* Wait for the final reply to `id` and print it; the process exit status. */
static int receive_reply(void *sock, uint64_t id) {
    for (;;) {
        zmq_msg_t hdr;
        zmq_msg_init(&hdr);
        if (zmq_msg_recv(&hdr, sock, 0) < 0) {
            fprintf(stderr, "edged_infer: no reply: %s\n", zmq_strerror(zmq_errno()));
            return EXIT_NO_REPLY;
        }
        int more = zmq_msg_more(&hdr);
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        int parsed = msgpack_unpack_next(&up, zmq_msg_data(&hdr), zmq_msg_size(&hdr), NULL) ==
                     MSGPACK_UNPACK_SUCCESS;
        const msgpack_object *h = parsed ? &up.data : NULL, *rid = get(h, "id");
        int status = -1;
        if (!rid || rid->type != MSGPACK_OBJECT_POSITIVE_INTEGER || rid->via.u64 != id) {
            drain(sock, more); /* a stale reply (§7.2): not ours */
        } else if (get(h, "ok") && get(h, "ok")->type == MSGPACK_OBJECT_BOOLEAN &&
                   get(h, "ok")->via.boolean) {
            const msgpack_object *version = get(h, "version"), *outputs = get(h, "outputs");
            printf("model ");
            print_str(stdout, get(h, "model"));
            printf(" version %" PRIu64 " trace ",
                   version && version->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? version->via.u64
                                                                               : 0);
            print_str(stdout, get(h, "trace"));
            printf("\n");
            status = 0;
            uint32_t n = outputs && outputs->type == MSGPACK_OBJECT_ARRAY ? outputs->via.array.size
                                                                          : 0;
            for (uint32_t i = 0; i < n && status == 0; i++) {
                zmq_msg_t frame;
                zmq_msg_init(&frame);
                if (!more || zmq_msg_recv(&frame, sock, 0) < 0 ||
                    print_output(&outputs->via.array.ptr[i], &frame) != 0) {
                    fprintf(stderr, "edged_infer: output %u does not match its frame\n", i);
                    status = EXIT_NO_REPLY;
                }
                more = zmq_msg_more(&frame);
                zmq_msg_close(&frame);
            }
            drain(sock, more);
        } else {
            const msgpack_object *error = get(h, "error");
            print_str(stderr, get(error, "code"));
            fputs(": ", stderr);
            print_str(stderr, get(error, "message"));
            fputs("\n", stderr);
            drain(sock, more);
            status = EXIT_ERROR_REPLY;
        }
        msgpack_unpacked_destroy(&up);
        zmq_msg_close(&hdr);
        if (status >= 0) return status;
    }
}

/* PROTOCOL §1: $EDGED_SOCKET, else the daemon's default runtime directory, else /run/edged. */
static void default_endpoint(char *out, size_t size) {
    const char *env = getenv("EDGED_SOCKET"), *xdg = getenv("XDG_RUNTIME_DIR");
    if (env && *env) {
        snprintf(out, size, "%s", env);
        return;
    }
    char path[512];
    if (xdg && *xdg) snprintf(path, sizeof path, "%s/edged/infer.sock", xdg);
    else snprintf(path, sizeof path, "/tmp/edged-%u/infer.sock", (unsigned)getuid());
    struct stat st;
    if (stat(path, &st) != 0 && stat("/run/edged/infer.sock", &st) == 0)
        snprintf(path, sizeof path, "/run/edged/infer.sock");
    snprintf(out, size, "ipc://%s", path);
}

int main(int argc, char **argv) {
    char endpoint[600];
    default_endpoint(endpoint, sizeof endpoint);
    int timeout_ms = 5000, opt;
    double deadline_ms = -1;
    long version = -1;
    const char *trace = NULL;
    while ((opt = getopt(argc, argv, "e:t:d:V:T:h")) != -1) {
        switch (opt) {
        case 'e': snprintf(endpoint, sizeof endpoint, "%s", optarg); break;
        case 't': timeout_ms = atoi(optarg); break;
        case 'd': deadline_ms = atof(optarg); break;
        case 'V': version = atol(optarg); break;
        case 'T': trace = optarg; break;
        default: usage(); return EXIT_USAGE;
        }
    }
    int n_inputs = argc - optind - 1;
    if (n_inputs < 0 || n_inputs > MAX_INPUTS) {
        usage();
        return EXIT_USAGE;
    }
    const char *model = argv[optind];
    static struct tensor inputs[MAX_INPUTS];
    for (int i = 0; i < n_inputs; i++)
        if (parse_input(argv[optind + 1 + i], &inputs[i]) != 0) return EXIT_USAGE;

    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    if (zmq_connect(sock, endpoint) != 0) {
        fprintf(stderr, "edged_infer: cannot connect to %s: %s\n", endpoint,
                zmq_strerror(zmq_errno()));
        return EXIT_NO_REPLY;
    }
    uint64_t id = (uint64_t)getpid(); /* any id: replies to it are told apart by it */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_header(&sb, id, model, version, deadline_ms, trace, inputs, n_inputs);
    send_frame(sock, sb.data, sb.size, n_inputs > 0);
    msgpack_sbuffer_destroy(&sb);
    for (int i = 0; i < n_inputs; i++) {
        send_frame(sock, inputs[i].data, inputs[i].size, i + 1 < n_inputs);
        free(inputs[i].data);
    }
    int status = receive_reply(sock, id);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return status;
}
