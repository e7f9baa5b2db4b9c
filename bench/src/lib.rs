//! Benchmarks of blockgate as a whole and the baselines each figure is set beside.
//!
//! The whole-gateway measurements (fio and nbdcopy over NBD, upload drain, cold reads, memory,
//! snapshot cut) are driven by `scripts/bench.sh`; this package holds the pieces that need
//! Rust, such as `s3-baseline`, the raw aws-sdk-s3 throughput of the same S3 server. Nothing
//! here is a test: these binaries print numbers, they do not assert them.
