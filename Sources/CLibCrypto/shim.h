#ifndef TALLY_CLIBCRYPTO_SHIM_H
#define TALLY_CLIBCRYPTO_SHIM_H

#include <openssl/evp.h>

#endif
