/*
 * shm_client: one `infer` request to edged whose inputs lie in shared memory, from C, with libzmq
 * and msgpack-c only.
 *
 * Written from docs/PROTOCOL.md (§11 shared-memory regions, §4 requests, §5 replies). The
 * inputs are copied once into a sealed memfd, the region, which is handed to the daemon over
 * regions.sock (beside infer.sock) in SCM_RIGHTS; the request then says where each input lies
 * instead of carrying its bytes. With -o, the daemon writes that output into the region too,
 * after the inputs. A camera process would make the region once and fill it frame after frame.
 * What it shares with edged_infer (dtypes, NAME=DTYPE:SHAPE:FILE, the reply) is in edged_wire.c.
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

#include "edged_wire.h"

#define ALIGN 64 /* where each tensor starts in the region: what the daemon's models read best */

const char *const PROGRAM = "shm_client";

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

/* The infer header: input i by reference at `offsets[i]`, `output` (if any) at `out_offset`. */
static void pack_header(msgpack_sbuffer *sb, uint64_t id, const char *model,
                        const struct tensor *inputs, const size_t *offsets, int n_inputs,
                        const struct region *r, const char *output, size_t out_offset) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    pack_request(&pk, 5 + (output != NULL), id, model);
    pack_str(&pk, "inputs");
    msgpack_pack_array(&pk, (size_t)n_inputs);
    for (int i = 0; i < n_inputs; i++) {
        pack_tensor(&pk, &inputs[i], 2);
        pack_str(&pk, "region");
        pack_str(&pk, r->token);
        pack_str(&pk, "offset");
        msgpack_pack_uint64(&pk, offsets[i]);
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

/* An output the daemon wrote into our region (`arg`) comes in no frame: its bytes are there. */
static int in_region(const msgpack_object *desc, void *arg, const unsigned char **data,
                     size_t *size) {
    const struct region *r = arg;
    const msgpack_object *offset = get(desc, "offset");
    if (!get(desc, "region")) return 0;
    uint64_t at = offset ? offset->via.u64 : r->size;
    fprintf(stderr, "%s: output ", PROGRAM);
    print_str(stderr, get(desc, "name"));
    fprintf(stderr, " came in the region at offset %" PRIu64 "\n", at);
    if (at > r->size) return -1;
    *data = r->base + at;
    *size = r->size - at;
    return 1;
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
    size_t offsets[MAX_INPUTS], size = 0;
    for (int i = 0; i < n_inputs; i++) {
        if (parse_input(argv[optind + 1 + i], &inputs[i]) != 0) return EXIT_USAGE;
        offsets[i] = size;
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
        memcpy(r.base + offsets[i], inputs[i].data, inputs[i].size);
        free(inputs[i].data);
    }

    void *ctx = zmq_ctx_new();
    void *sock = open_socket(ctx, endpoint, timeout_ms, routing_id, sizeof routing_id);
    if (!sock) return EXIT_NO_REPLY;
    uint64_t id = (uint64_t)getpid();
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_header(&sb, id, model, inputs, offsets, n_inputs, &r, output, out_offset);
    zmq_send(sock, sb.data, sb.size, 0); /* the header alone: no tensor frames */
    msgpack_sbuffer_destroy(&sb);
    status = receive_reply(sock, id, in_region, &r);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    close(r.channel); /* the daemon unmaps the region */
    return status;
}
