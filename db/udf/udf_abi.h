/*
 * The loadable-function (UDF) ABI, written out so the UDF builds without the
 * ~600 MB server development package.
 *
 * Mirrors, field for field:
 *   - MariaDB 10.x/11.x  include/mysql_com.h  (enum Item_result, st_udf_args,
 *     st_udf_init; my_bool is char there)
 *   - MySQL 8.x          include/mysql/udf_registration_types.h (UDF_ARGS,
 *     UDF_INIT; bool there, one byte like char; enum Item_result adds
 *     INVALID_RESULT = -1, which the server never passes to a UDF)
 * Both servers allocate these structs and pass pointers; the layouts are
 * identical on x86-64 and aarch64 Linux (checked against both headers).
 * If a future server appends fields, reading this prefix stays sound.
 */
#ifndef RECSQL_UDF_ABI_H
#define RECSQL_UDF_ABI_H

typedef char udf_bool; /* MariaDB my_bool (char); MySQL 8 bool: both one byte */

enum Item_result {
    STRING_RESULT = 0,
    REAL_RESULT,
    INT_RESULT,
    ROW_RESULT,
    DECIMAL_RESULT,
    TIME_RESULT /* MariaDB only; converted by the server before a UDF sees it */
};

typedef struct st_udf_args {
    unsigned int arg_count;          /* number of arguments */
    enum Item_result *arg_type;      /* type of each argument (init may coerce) */
    char **args;                     /* argument values; NULL pointer = SQL NULL */
    unsigned long *lengths;          /* byte length of string/decimal arguments */
    char *maybe_null;                /* 1 for arguments that may be NULL */
    const char **attributes;         /* argument names / expressions */
    unsigned long *attribute_lengths;
    void *extension;
} UDF_ARGS;

typedef struct st_udf_init {
    udf_bool maybe_null;       /* 1 if the function can return NULL */
    unsigned int decimals;     /* for REAL functions */
    unsigned long max_length;  /* for STRING functions */
    char *ptr;                 /* per-call state owned by the UDF */
    udf_bool const_item;       /* 1 if the result never changes */
    void *extension;
} UDF_INIT;

#endif
