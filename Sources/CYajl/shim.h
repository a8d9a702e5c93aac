#ifndef TALLY_CYAJL_SHIM_H
#define TALLY_CYAJL_SHIM_H

#include <yajl/yajl_parse.h>
#include <yajl/yajl_gen.h>

// yajl_config() and yajl_gen_config() are variadic, which Swift cannot call.
// Every option used here takes a single int.
static inline int tally_yajl_set_option(yajl_handle handle, yajl_option option, int value) {
    return yajl_config(handle, option, value);
}

static inline int tally_yajl_gen_set_option(yajl_gen generator, yajl_gen_option option, int value) {
    return yajl_gen_config(generator, option, value);
}

#endif
