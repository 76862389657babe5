/*
 * The recsql vectors file (written by db/vectors.py) and its reader.
 *
 * A flat little-endian file: a 256-byte header, then 64-byte-aligned sections.
 *   0   char[8] magic "RECSQLVF"      8   u32 version (2; version 1 is read too)
 *   12  u32 crc32 (zlib) of bytes [16, file_size)
 *   16  u64 file_size                 24  u32 dim
 *   28  u32 flags (bit 0: softmax probabilities, section 2 present;
 *                  bit 1: a bonus, sections 6 and 7 present; version 2 only)
 *   32  u64 num_users (vector rows)   40  u64 num_items
 *   48  u64 num_user_ids              56  u64 num_item_ids
 *   64  u64 user_slots                72  u64 item_slots (powers of two)
 *   80  u32 fallback (0 null, 1 constant, 2 per item + constant)
 *   84  f32 fallback_score
 *   88  u32 user_max_probe            92  u32 item_max_probe
 *   96  u64 num_bonus (bonus entries; 0 without flag bit 1)
 *   104 reserved (zero) up to 128
 *   128 8 x {u64 offset, u64 length} (version 1: the first 6, then zeros): the sections,
 *       in this order:
 *       0 user vectors f32[num_users][dim], 1 item vectors f32[num_items][dim],
 *       2 user log normalizers f32[num_users] (flag bit 0, else empty),
 *       3 item fallback scores f32[num_items] (fallback 2, else empty),
 *       4 user slots {i64 id, i64 row}[user_slots], 5 item slots {i64 id, i64 row}[item_slots],
 *       6 bonus offsets u64[num_users + 1] (flag bit 1, else empty),
 *       7 bonus entries {i32 item row, f32 value}[num_bonus] (flag bit 1, else empty).
 * Scores: logit = user . item + bonus; a probability model then scores
 * exp(min(logit - log normalizer, 0)), the others the logit. The similarity of two
 * products is the cosine of their item vectors (0 when either is zero). bonus(u, i) is the value of
 * the entry of row i among user row u's entries [offsets[u], offsets[u + 1]), which are
 * sorted by item row (one binary search), and 0 when there is none or no bonus.
 * An id index is an open-addressing hash table with linear probing: an id's
 * home slot is mix64(id) & (slots - 1), it lies at most max_probe slots further
 * on, and a slot with row -1 is empty. One cache miss finds an id's row.
 *
 * The reader trusts nothing: every count, offset and length is checked when the
 * file is opened, and every bucket bound and row number when it is used, so a
 * file that passes the checksum but lies still cannot make it read out of bounds.
 * The bonus offsets are checked at open (0 first, num_bonus last, never decreasing); an
 * entry's item row is only compared with the row the item index gave, never used to
 * read, so a row out of range or out of order can only miss.
 * vectors.c has no global state: the fuzz driver (fuzz_vectors.c) builds it alone.
 */
#ifndef RECSQL_VECTORS_H
#define RECSQL_VECTORS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define RECSQL_VECTORS_VERSION 2
#define RECSQL_VECTORS_HEADER 256
#define RECSQL_VECTORS_ERR 128

typedef struct {
    const int64_t *slots; /* id, row, id, row, ...; row -1: empty */
    uint64_t num_slots, num_ids, num_rows;
    uint32_t max_probe;
} recsql_id_index;

typedef struct {
    int32_t row; /* item row */
    float value;
} recsql_bonus_entry;

typedef struct {
    const unsigned char *base; /* the read-only mapping */
    size_t size;
    dev_t dev;
    ino_t ino;
    long long mtime_ns;
    uint32_t version, dim, fallback, crc;
    int probabilities;
    float fallback_score;
    const float *user_vectors, *item_vectors, *user_log_normalizer, *item_fallback;
    recsql_id_index users, items;
    const uint64_t *bonus_offsets; /* NULL: no bonus */
    const recsql_bonus_entry *bonus;
    uint64_t num_bonus;
} recsql_vectors;

/* Map and check `path`; 0 on success, else -1 with a one-line reason in err. */
int recsql_vectors_open(const char *path, unsigned long long max_bytes, recsql_vectors *out,
                        char err[RECSQL_VECTORS_ERR]);
void recsql_vectors_close(recsql_vectors *v);

/* 1: *score is set; 0: SQL NULL (unknown id under the null policy);
 * -1: the file is corrupt (reason in err). */
int recsql_vectors_score(const recsql_vectors *v, int64_t user_id, int64_t item_id, double *score,
                         char err[RECSQL_VECTORS_ERR]);

/* The cosine of two products' item vectors, as Recommender.similarity computes it.
 * 1: *score is set; 0: SQL NULL (an unknown product, whatever the fallback policy);
 * -1: the file is corrupt (reason in err). */
int recsql_vectors_similar(const recsql_vectors *v, int64_t item_a, int64_t item_b, double *score,
                           char err[RECSQL_VECTORS_ERR]);

#endif
