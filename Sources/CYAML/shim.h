#ifndef TALLY_CYAML_SHIM_H
#define TALLY_CYAML_SHIM_H

#include <yaml.h>

#endif
