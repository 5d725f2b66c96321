//! Which partition of `task-events` a stream lives in: librdkafka's default partitioner
//! (`consistent_random`: CRC-32 of the key modulo the partition count), so records appended before
//! partitions were owned stay where they are, and every instance agrees without asking anyone.

/// The partition of the stream with Kafka key `key` in a topic of `partitions` partitions.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    debug_assert!(partitions > 0);
    (crc32fast::hash(key.as_bytes()) % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_librdkafkas_consistent_partitioner() {
        // rd_crc32 is zlib's CRC-32: the standard check value of "123456789" is 0xCBF43926.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition_of("123456789", 12), (0xCBF4_3926u32 % 12) as i32);
    }

    #[test]
    fn spreads_keys_over_every_partition() {
        let mut seen = [0u32; 12];
        for i in 0..12_000 {
            seen[partition_of(&uuid::Uuid::now_v7().to_string(), 12) as usize] += 1;
            let _ = i;
        }
        assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
    }
}
