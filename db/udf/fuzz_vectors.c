/*
 * A driver for the vectors-file reader alone (vectors.c), built with
 * AddressSanitizer by `make fuzz_vectors`; tests run it in a subprocess.
 *
 *   fuzz_vectors FILE...   open each file; print "ERR <reason>" or, after scoring
 *                          every slot's id against 8 of the other side's and some
 *                          random ids, "OK <scored pairs>". A crash or a sanitizer
 *                          report is the bug the fuzz test looks for.
 *   fuzz_vectors --score FILE < pairs   "user item" per line -> the score
 *                          (%.9g), NULL, or ERR <reason>, one line each.
 *   fuzz_vectors --similar FILE < pairs   "item item" per line -> their cosine, the same way.
 */
#include "vectors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BYTES (1ULL << 36)

static unsigned long long seed = 88172645463325252ULL;
static int64_t next_random(void)
{
    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
    return (int64_t)seed;
}

/* Each slot's id against the ids of 8 slots of the other side, so that a small model's
 * bonus runs are searched for products they hold and products they lack; then random ids. */
static long probe(const recsql_vectors *v)
{
    char err[RECSQL_VECTORS_ERR];
    double s;
    long scored = 0;
    const recsql_id_index *x[2] = {&v->users, &v->items};
    for (int side = 0; side < 2; side++)
        for (uint64_t k = 0; k < x[side]->num_slots && k < 8192; k++)
            for (uint64_t j = 0; j < 8; j++) {
                const recsql_id_index *o = x[!side];
                int64_t id = x[side]->slots[2 * k];
                int64_t other = o->slots[2 * ((8 * k + j) & (o->num_slots - 1))];
                int rc = side ? recsql_vectors_score(v, other, id, &s, err)
                              : recsql_vectors_score(v, id, other, &s, err);
                scored += rc >= 0;
            }
    for (int k = 0; k < 256; k++)
        scored += recsql_vectors_score(v, next_random() % 1000, next_random(), &s, err) >= 0;
    /* similarity: each item slot's id against 8 others, then random ids */
    for (uint64_t k = 0; k < v->items.num_slots && k < 8192; k++)
        for (uint64_t j = 0; j < 8; j++) {
            int64_t a = v->items.slots[2 * k];
            int64_t b = v->items.slots[2 * ((8 * k + j) & (v->items.num_slots - 1))];
            scored += recsql_vectors_similar(v, a, b, &s, err) >= 0;
        }
    for (int k = 0; k < 256; k++)
        scored += recsql_vectors_similar(v, next_random(), next_random() % 1000, &s, err) >= 0;
    return scored;
}

static int score_pairs(const char *path, int similar)
{
    recsql_vectors v;
    char err[RECSQL_VECTORS_ERR];
    long long u, i;
    double s;
    if (recsql_vectors_open(path, MAX_BYTES, &v, err)) {
        printf("ERR %s\n", err);
        return 0;
    }
    while (scanf("%lld %lld", &u, &i) == 2) {
        int rc = similar ? recsql_vectors_similar(&v, u, i, &s, err)
                         : recsql_vectors_score(&v, u, i, &s, err);
        if (rc > 0)
            printf("%.9g\n", s);
        else
            printf(rc ? "ERR %s\n" : "NULL\n", err);
    }
    recsql_vectors_close(&v);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && (!strcmp(argv[1], "--score") || !strcmp(argv[1], "--similar")))
        return score_pairs(argv[2], !strcmp(argv[1], "--similar"));
    for (int a = 1; a < argc; a++) {
        recsql_vectors v;
        char err[RECSQL_VECTORS_ERR];
        if (recsql_vectors_open(argv[a], MAX_BYTES, &v, err)) {
            printf("ERR %s\n", err);
            continue;
        }
        printf("OK %ld\n", probe(&v));
        recsql_vectors_close(&v);
    }
    return 0;
}
