/*
 * edged_wire: the protocol as edged_infer and shm_client both speak it (see edged_wire.h).
 */
#include "edged_wire.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* PROTOCOL §3, exactly these spellings */
static const struct dtype DTYPES[] = {
    {"bool", 1},  {"int8", 1},   {"uint8", 1},  {"int16", 2},   {"uint16", 2},  {"int32", 4},
    {"uint32", 4}, {"int64", 8}, {"uint64", 8}, {"float16", 2}, {"float32", 4}, {"float64", 8},
};

const struct dtype *find_dtype(const char *name, size_t len) {
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

int parse_input(char *spec, struct tensor *t) {
    char *eq = strchr(spec, '=');
    char *c1 = eq ? strchr(eq + 1, ':') : NULL;
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!eq || !c1 || !c2 || eq == spec || (size_t)(eq - spec) >= sizeof t->name) {
        fprintf(stderr, "%s: input '%s' is not NAME=DTYPE:SHAPE:FILE\n", PROGRAM, spec);
        return -1;
    }
    memcpy(t->name, spec, (size_t)(eq - spec));
    t->name[eq - spec] = '\0';
    t->dtype = find_dtype(eq + 1, (size_t)(c1 - eq - 1));
    if (!t->dtype) {
        fprintf(stderr, "%s: %s: unknown dtype '%.*s'\n", PROGRAM, t->name, (int)(c1 - eq - 1),
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
            fprintf(stderr, "%s: %s: bad shape '%.*s'\n", PROGRAM, t->name, (int)(c2 - c1 - 1),
                    c1 + 1);
            return -1;
        }
        t->shape[t->ndim++] = d;
        elements *= d;
        p = end < c2 ? end + 1 : end;
    }
    t->data = read_file(c2 + 1, &t->size);
    if (!t->data) {
        fprintf(stderr, "%s: %s: cannot read %s: %s\n", PROGRAM, t->name, c2 + 1, strerror(errno));
        return -1;
    }
    if (t->size != elements * t->dtype->size) {
        fprintf(stderr, "%s: %s: %s holds %zu bytes, the shape needs %" PRIu64 "\n", PROGRAM,
                t->name, c2 + 1, t->size, elements * t->dtype->size);
        return -1;
    }
    return 0;
}

void pack_str(msgpack_packer *pk, const char *s) {
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

void pack_request(msgpack_packer *pk, size_t n_keys, uint64_t id, const char *model) {
    msgpack_pack_map(pk, n_keys);
    pack_str(pk, "v");
    msgpack_pack_uint8(pk, 1);
    pack_str(pk, "id");
    msgpack_pack_uint64(pk, id);
    pack_str(pk, "op");
    pack_str(pk, "infer");
    pack_str(pk, "model");
    pack_str(pk, model);
}

void pack_tensor(msgpack_packer *pk, const struct tensor *t, size_t n_more) {
    msgpack_pack_map(pk, 3 + n_more);
    pack_str(pk, "name");
    pack_str(pk, t->name);
    pack_str(pk, "dtype");
    pack_str(pk, t->dtype->name);
    pack_str(pk, "shape");
    msgpack_pack_array(pk, (size_t)t->ndim);
    for (int d = 0; d < t->ndim; d++) msgpack_pack_uint64(pk, t->shape[d]);
}

const msgpack_object *get(const msgpack_object *o, const char *key) {
    if (!o || o->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object *k = &o->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key) &&
            memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
            return &o->via.map.ptr[i].val;
    }
    return NULL;
}

int is_str(const msgpack_object *o) { return o && o->type == MSGPACK_OBJECT_STR; }

int is_true(const msgpack_object *o) {
    return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
}

void print_str(FILE *out, const msgpack_object *o) {
    if (is_str(o)) fwrite(o->via.str.ptr, 1, o->via.str.size, out);
    else fputs("?", out);
}

void print_error(const msgpack_object *error) {
    print_str(stderr, get(error, "code"));
    fputs(": ", stderr);
    print_str(stderr, get(error, "message"));
    fputs("\n", stderr);
}

/* Half precision to float by hand: C has no portable float16 type. */
static double half_to_double(uint16_t h) {
    int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exponent == 0) return sign * mantissa * 0x1p-24;
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    return sign * (1.0 + mantissa / 1024.0) * (double)(1 << exponent) * 0x1p-15;
}

/* Little-endian element `i` of `data`, printed; memcpy because frames have no alignment. */
static void print_element(const unsigned char *data, size_t i, const struct dtype *dt) {
    const unsigned char *p = data + i * dt->size;
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

/*
 * Print one output: its description line and its values; 0 if its bytes are there. A frame holds
 * exactly its output (`whole`); a region has room for it and maybe more.
 */
static int print_output(const msgpack_object *desc, const unsigned char *data, size_t size,
                        int whole) {
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
    if (whole ? size != elements * dt->size : size < elements * dt->size) return -1;
    for (uint64_t i = 0; i < elements; i++) {
        if (i) putchar(' ');
        print_element(data, i, dt);
    }
    printf("\n");
    return 0;
}

void *open_socket(void *ctx, const char *endpoint, int timeout_ms, const unsigned char *routing_id,
                  size_t id_len) {
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    if (routing_id) zmq_setsockopt(sock, ZMQ_ROUTING_ID, routing_id, id_len); /* before connect */
    if (zmq_connect(sock, endpoint) != 0) {
        fprintf(stderr, "%s: cannot connect to %s: %s\n", PROGRAM, endpoint,
                zmq_strerror(zmq_errno()));
        zmq_close(sock);
        return NULL;
    }
    return sock;
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

/* Print a result's outputs, each from its frame or from where `locate` finds it; the status. */
static int print_outputs(void *sock, int *more, const msgpack_object *outputs,
                         locate_output locate, void *arg) {
    uint32_t n = outputs && outputs->type == MSGPACK_OBJECT_ARRAY ? outputs->via.array.size : 0;
    for (uint32_t i = 0; i < n; i++) {
        const msgpack_object *desc = &outputs->via.array.ptr[i];
        const unsigned char *data;
        size_t size;
        int placed = locate ? locate(desc, arg, &data, &size) : 0;
        if (placed != 0) {
            if (placed < 0 || print_output(desc, data, size, 0) != 0) {
                fprintf(stderr, "%s: output %u does not fit its region\n", PROGRAM, i);
                return EXIT_NO_REPLY;
            }
            continue;
        }
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        int bad = !*more || zmq_msg_recv(&frame, sock, 0) < 0 ||
                  print_output(desc, zmq_msg_data(&frame), zmq_msg_size(&frame), 1) != 0;
        *more = zmq_msg_more(&frame);
        zmq_msg_close(&frame);
        if (bad) {
            fprintf(stderr, "%s: output %u does not match its frame\n", PROGRAM, i);
            return EXIT_NO_REPLY;
        }
    }
    return 0;
}

int receive_reply(void *sock, uint64_t id, locate_output locate, void *arg) {
    for (;;) {
        zmq_msg_t hdr;
        zmq_msg_init(&hdr);
        if (zmq_msg_recv(&hdr, sock, 0) < 0) {
            fprintf(stderr, "%s: no reply: %s\n", PROGRAM, zmq_strerror(zmq_errno()));
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
            /* a stale reply (§7.2): not ours */
        } else if (is_true(get(h, "ok"))) {
            const msgpack_object *version = get(h, "version");
            printf("model ");
            print_str(stdout, get(h, "model"));
            printf(" version %" PRIu64 " trace ",
                   version && version->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? version->via.u64
                                                                               : 0);
            print_str(stdout, get(h, "trace"));
            printf("\n");
            status = print_outputs(sock, &more, get(h, "outputs"), locate, arg);
        } else {
            print_error(get(h, "error"));
            status = EXIT_ERROR_REPLY;
        }
        drain(sock, more);
        msgpack_unpacked_destroy(&up);
        zmq_msg_close(&hdr);
        if (status >= 0) return status;
    }
}
