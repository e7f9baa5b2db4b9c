//! The bucket-level catalog of volumes and snapshots, for a process that holds no write log
//! (the block-storage API).
