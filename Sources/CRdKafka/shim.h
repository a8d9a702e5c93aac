#ifndef TALLY_CRDKAFKA_SHIM_H
#define TALLY_CRDKAFKA_SHIM_H

#include <librdkafka/rdkafka.h>
// The mock cluster API is for the dev-broker command and the tests only (see KafkaMock).
#include <librdkafka/rdkafka_mock.h>

// rd_kafka_producev() is a variadic macro that Swift cannot call. This wrapper passes the
// same fields. The producer copies key, value and headers (RD_KAFKA_MSG_F_COPY), and takes
// ownership of `headers` only when it returns RD_KAFKA_RESP_ERR_NO_ERROR.
static inline rd_kafka_resp_err_t tally_rd_kafka_produce(
    rd_kafka_t *rk, const char *topic, int32_t partition,
    const void *key, size_t key_len, const void *value, size_t value_len,
    rd_kafka_headers_t *headers, int64_t timestamp_ms) {
    return rd_kafka_producev(
        rk,
        RD_KAFKA_V_TOPIC(topic),
        RD_KAFKA_V_PARTITION(partition),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_KEY((void *)key, key_len),
        RD_KAFKA_V_VALUE((void *)value, value_len),
        RD_KAFKA_V_HEADERS(headers),
        RD_KAFKA_V_TIMESTAMP(timestamp_ms),
        RD_KAFKA_V_END);
}

#endif
