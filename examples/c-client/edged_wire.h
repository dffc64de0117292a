/*
 * edged_wire: what edged_infer and shm_client both speak of docs/PROTOCOL.md — the dtypes (§3),
 * an input's description and its NAME=DTYPE:SHAPE:FILE spelling, the infer header's common keys
 * (§4.1), and the reply: stale ones skipped (§7.2), outputs printed, error codes reported (§5, §8).
 */
#ifndef EDGED_WIRE_H
#define EDGED_WIRE_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define MAX_INPUTS 64 /* PROTOCOL §6: entries in `inputs` */
#define MAX_DIMS 8    /* PROTOCOL §6: dimensions per tensor */

enum { EXIT_NO_REPLY = 1, EXIT_USAGE = 2, EXIT_ERROR_REPLY = 3 };

/* Each program's name, which begins its messages on stderr. */
extern const char *const PROGRAM;

struct dtype {
    const char *name;
    size_t size;
};

struct tensor {
    char name[257];
    const struct dtype *dtype;
    uint64_t shape[MAX_DIMS];
    int ndim;
    unsigned char *data;
    size_t size;
};

/*
 * Where an output that came in no frame lies: 1 and its bytes (`*size` is the room there), 0 if
 * it comes in the next frame, -1 if it cannot be found. NULL: every output comes in a frame.
 */
typedef int (*locate_output)(const msgpack_object *desc, void *arg, const unsigned char **data,
                             size_t *size);

const struct dtype *find_dtype(const char *name, size_t len);

/* Parse NAME=DTYPE:SHAPE:FILE and read FILE; 0 on success, else a message on stderr. */
int parse_input(char *spec, struct tensor *t);

void pack_str(msgpack_packer *pk, const char *s);

/* Open a header map of `n_keys` keys and pack its first four: v, id, op "infer", model. */
void pack_request(msgpack_packer *pk, size_t n_keys, uint64_t id, const char *model);

/* An input's description: a map of name, dtype, shape and the `n_more` keys packed after it. */
void pack_tensor(msgpack_packer *pk, const struct tensor *t, size_t n_more);

/* The value of str key `key` in map `o`, or NULL. */
const msgpack_object *get(const msgpack_object *o, const char *key);

int is_str(const msgpack_object *o);
int is_true(const msgpack_object *o);
void print_str(FILE *out, const msgpack_object *o);

/* "CODE: message" of an error (a reply's, or an answer's on regions.sock) to stderr. */
void print_error(const msgpack_object *error);

/* A DEALER connected to `endpoint` with `routing_id` (NULL: libzmq's), or NULL after a message. */
void *open_socket(void *ctx, const char *endpoint, int timeout_ms, const unsigned char *routing_id,
                  size_t id_len);

/* Wait for the final reply to `id` and print it; the process exit status. */
int receive_reply(void *sock, uint64_t id, locate_output locate, void *arg);

#endif
