/*
 * edged_infer: one `infer` request to edged from C, with libzmq and msgpack-c only.
 *
 * Written from docs/PROTOCOL.md (§1 transport, §2 layout, §3 dtypes, §4 requests, §5 replies,
 * §7.2 stale replies, §8 errors). A sensor process would keep the socket open and loop; this
 * program sends one request so that it can be run, read and tested on its own.
 * What it shares with shm_client (dtypes, NAME=DTYPE:SHAPE:FILE, the reply) is in edged_wire.c.
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
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "edged_wire.h"

const char *const PROGRAM = "edged_infer";

static void usage(void) {
    fprintf(stderr,
            "usage: edged_infer [-e ENDPOINT] [-t TIMEOUT_MS] [-d DEADLINE_MS] [-V VERSION]\n"
            "                   [-T TRACE] MODEL NAME=DTYPE:SHAPE:FILE ...\n");
}

/* Frame 0 of an infer request (PROTOCOL §4.1); `version` < 0 and `deadline_ms` < 0 omit keys. */
static void pack_header(msgpack_sbuffer *sb, uint64_t id, const char *model, long version,
                        double deadline_ms, const char *trace, const struct tensor *inputs,
                        int n_inputs) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    pack_request(&pk, 5 + (version >= 0) + (deadline_ms >= 0) + (trace != NULL), id, model);
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
    for (int i = 0; i < n_inputs; i++) pack_tensor(&pk, &inputs[i], 0);
}

static void send_frame(void *sock, const void *data, size_t size, int more) {
    zmq_msg_t m;
    zmq_msg_init_size(&m, size);
    memcpy(zmq_msg_data(&m), data, size);
    if (zmq_msg_send(&m, sock, more ? ZMQ_SNDMORE : 0) < 0) zmq_msg_close(&m);
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
    void *sock = open_socket(ctx, endpoint, timeout_ms, NULL, 0);
    if (!sock) return EXIT_NO_REPLY;
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
    int status = receive_reply(sock, id, NULL, NULL);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return status;
}
