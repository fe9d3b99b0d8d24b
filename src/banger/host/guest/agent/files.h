/* What files.c (the transfers' table), put.c (FILE_PUT) and get.c (FILE_GET) share. */
#ifndef BANGER_FILES_H
#define BANGER_FILES_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct put;
struct get;

struct xfer {
    bool used, get;
    uint32_t chan;
    struct put *p;
    struct get *g;
};

/* A free slot for a new chan (ERROR sent and NULL if the chan is taken or none is free). */
struct xfer *xfer_slot(uint32_t chan);
/* End a transfer: free it (a put's temporary file is removed). */
void xfer_release(struct xfer *x);
/* A request's path field (tag 1): false (and ERROR sent) if missing or not a path. */
bool path_field(uint32_t chan, const unsigned char *b, size_t n, const char *what, char *out);
/* A name fit for an ERROR message (printable ASCII; a static buffer). */
const char *shown(const char *name);

/* FILE_PUT's side (put.c): end a put (its temporary file removed); DATA, DATA_EOF or
 * CREDIT on its chan. */
void put_end(struct put *p);
void put_frame(struct xfer *x, int kind, const unsigned char *b, size_t n);

void get_end(struct get *g);
bool get_wants(const struct get *g);
void get_credit(struct get *g, int64_t bytes);
void get_pump(struct xfer *x);
#endif
