//! snapblk: a vhost-user virtio-blk daemon.
//!
//! Module map (each module documents what it owns and its locking model):
//! - [`cli`]: command-line subcommands and argument parsing.
//! - [`disk`]: which [`blockdev::BlockDev`] stack is served ([`disk::open_disk`]) and the
//!   write-cache switch hook ([`disk::WriteCacheControl`]).
//! - [`image_cmd`]: the qemu-img-style image subcommands (create, info, check, commit, export,
//!   checksum).
//! - [`probe_guard`]: a probed-raw image refuses writes that would change its probed format;
//!   the `serve` backing-file policy.
//! - [`img_size`]: image sizes parsed as qemu-img parses them.
//! - [`virtio_blk`]: virtio-blk wire formats (request header, segments, config space, constants).
//! - [`device`]: the device model shared by the queues of one connection (config, features, WCE).
//! - [`request`]: request parsing/execution over guest memory and the per-queue processing pass.
//! - [`inflight`]: per-queue executors that keep the guest's queue depth in flight and complete
//!   each request to the used ring as it finishes.
//! - [`reconnect`]: in-flight tracking (INFLIGHT_SHMFD) so a restarted daemon resubmits the
//!   requests a dead one left in flight.
//! - [`vhu_blk`]: the vhost-user backend glue (one worker thread per queue).
//! - [`sandbox`]: `--user` privilege drop and the seccomp allow-list of the serving daemon.
//! - [`serve`]: daemon lifecycle (socket, reconnects, SIGTERM/SIGINT, final flush).
//! - [`live`]: what the request path, the control socket and the metrics share (pause gate,
//!   statistics, host cache-mode override); [`pause`]: the request pause gate;
//!   [`snapshot`]: the image chain and live snapshots; [`metrics`]: statistics and their
//!   Prometheus/JSON export; [`metrics_http`]: the `--metrics` endpoint; [`control`]: the
//!   `--control-socket` server; [`ctl`]: the `snapblk ctl` client.

pub mod cli;
pub mod control;
pub mod convert_cmd;
pub mod ctl;
pub mod device;
pub mod disk;
pub mod image_cmd;
pub mod img_size;
pub mod inflight;
pub mod journal;
pub mod live;
pub mod metrics;
pub mod metrics_http;
pub mod pause;
pub mod probe_guard;
pub mod reconnect;
pub mod request;
pub mod sandbox;
pub mod serve;
mod shared_map;
pub mod snapshot;
pub mod uring;
pub mod vhu_blk;
pub mod virtio_blk;
