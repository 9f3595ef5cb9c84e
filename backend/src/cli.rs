//! Command-line interface: the `snapblk` subcommands and their arguments (clap derive).
//!
//! Only parsing and validation of individual values live here; `main.rs` dispatches each
//! subcommand to its module (`serve` for [`ServeArgs`]). No state, no locks.

use std::path::PathBuf;

use cache::parse_size;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::image_cmd::{
    CheckArgs, ChecksumArgs, CommitArgs, CreateArgs, ExportArgs, FormatArg, InfoArgs, SourceArgs,
};

/// Largest `--num-queues`.
pub const MAX_NUM_QUEUES: u16 = 16;
/// Largest `--queue-size`.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest `--io-threads` (deprecated; `--max-inflight` replaces it).
pub const MAX_IO_THREADS: usize = 64;
/// Largest `--max-inflight`.
pub const MAX_INFLIGHT: usize = 1024;
/// Default `--max-inflight`: enough for a guest's usual queue depths (Linux submits up to the
/// queue size; fio tests commonly use 32) without idle threads piling up.
pub const DEFAULT_MAX_INFLIGHT: usize = 64;
/// Smallest `--queue-size` (a request needs at least header, data and status descriptors).
pub const MIN_QUEUE_SIZE: u16 = 4;

/// snapblk: a vhost-user virtio-blk daemon with copy-on-write snapshots and a write-back cache.
#[derive(Debug, Parser)]
#[command(name = "snapblk", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image to a vhost-user-blk frontend (QEMU, libblkio) over a unix socket.
    Serve(ServeArgs),
    /// Create a qcow2 image, optionally an overlay over a backing file.
    Create(CreateArgs),
    /// Show an image's format, sizes, backing chain and flags.
    Info(InfoArgs),
    /// Check a qcow2 image's metadata (exit 0 clean, 2 corrupt, 3 leaks only), optionally repair.
    Check(CheckArgs),
    /// Write an overlay's data into its backing file, then empty the overlay.
    Commit(CommitArgs),
    /// Write the guest-visible disk of an image (any chain) to a raw file.
    Export(ExportArgs),
    /// Convert an image (any chain) into a new raw or qcow2 image, optionally compressed.
    Convert(crate::convert_cmd::ConvertArgs),
    /// Print the sha256 of the guest-visible disk (equal for raw and any overlay chain).
    Checksum(ChecksumArgs),
    /// Send a command to a running daemon's --control-socket and print the answer as JSON.
    Ctl(crate::ctl::CtlArgs),
}

/// Write-cache mode announced to the guest at start (the guest may change it at run time through
/// the `writeback` config field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    /// Completed writes become durable at the next FLUSH.
    Writeback,
    /// Every write is durable before it completes.
    Writethrough,
}

/// Whether the image file's I/O bypasses the host page cache (`--direct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectMode {
    /// `on` for a writable qcow2 top with extended L2 entries, `large` for any other: what
    /// measured faster for each (BENCHMARKS.md). With subclusters a first write copies nothing
    /// from the base, so writebacks are small writes that O_DIRECT puts on the device together;
    /// with standard L2 entries each first write assembles a whole cluster around a read of the
    /// base, which the host page cache absorbs better.
    Auto,
    /// O_DIRECT below the folio cache for a writable qcow2 top (backing files stay buffered).
    On,
    /// Large aligned writes (at least `LARGE_DIRECT_MIN`) of a writable qcow2 top with
    /// O_DIRECT: guest writes that bypass the folio cache wherever they land, the cache's
    /// writebacks into clusters they allocate; everything else (the cache's rewrites in place
    /// included) through the host page cache.
    Large,
    /// Buffered I/O through the host page cache.
    Off,
}

impl DirectMode {
    /// The mode a writable qcow2 top gets: `Auto` decided by its L2 entries, the others as
    /// they are.
    pub fn for_top(self, extended_l2: bool) -> DirectMode {
        match self {
            DirectMode::Auto if extended_l2 => DirectMode::On,
            DirectMode::Auto => DirectMode::Large,
            m => m,
        }
    }
}

/// The smallest write `--direct large` sends with O_DIRECT: what bypasses the folio cache
/// (its default bypass threshold for writes) and what clustered writebacks of sequential data
/// reach.
pub const LARGE_DIRECT_MIN: usize = 256 << 10;

/// How a queue's reads reach the host files (`--aio`, as qemu-storage-daemon's `aio=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AioMode {
    /// Reads that miss the folio cache go on a per-queue io_uring, straight into guest
    /// buffers; everything else takes the I/O threads. The cache's batched writebacks into an
    /// O_DIRECT image (`--direct on`) go on io_uring too, all of a batch in flight at once.
    /// Falls back to `threads` with a warning where io_uring is unavailable.
    #[value(name = "io_uring")]
    IoUring,
    /// Every request on the queue's I/O threads (synchronous system calls), and writebacks one
    /// `pwrite` at a time.
    Threads,
}

/// Arguments of `snapblk serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// Disk image to serve.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Path of the vhost-user unix socket to listen on (a stale socket there is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Refuse writes; the guest sees a read-only disk.
    #[arg(long)]
    pub readonly: bool,
    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_NUM_QUEUES)))]
    pub num_queues: u16,
    /// Maximum size of each virtqueue (power of two).
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Device serial returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    pub serial: Option<String>,
    /// Logical block size in bytes (power of two, 512..=4096).
    #[arg(long, default_value_t = 512, value_name = "N", value_parser = parse_block_size)]
    pub logical_block_size: u32,
    /// Initial write-cache mode.
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    pub cache: CacheMode,
    /// Requests of one queue executing on the host at once: up to this many of the requests the
    /// guest has in flight on a queue reach the disk together, and each completes to the guest as
    /// soon as it finishes (1: each queue thread executes its requests one after another).
    #[arg(long, default_value_t = DEFAULT_MAX_INFLIGHT, value_name = "N",
          value_parser = parse_max_inflight)]
    pub max_inflight: usize,
    /// How reads that miss the cache reach the disk: a per-queue io_uring, or I/O threads.
    /// `--max-inflight 1` serves each queue serially whatever this says.
    #[arg(long, value_enum, default_value_t = AioMode::IoUring, value_name = "io_uring|threads")]
    pub aio: AioMode,
    /// O_DIRECT for a writable qcow2 image below the folio cache (on), for its large aligned
    /// writes only (large: writes of 256 KiB and more skip the host page cache and are not
    /// copied for replay), or the host page cache (off); auto: on for an image with extended
    /// L2 entries (the `--snapshot` overlay's kind), large for the others. Where the file
    /// system cannot do O_DIRECT the daemon stays buffered (a warning when `on` was asked for).
    #[arg(long, value_enum, default_value_t = DirectMode::Auto, value_name = "auto|on|large|off")]
    pub direct: DirectMode,
    /// Deprecated: `--io-threads N` means `--max-inflight N+1`.
    #[arg(long, value_name = "N", value_parser = parse_io_threads, hide = true,
          conflicts_with = "max_inflight")]
    pub io_threads: Option<usize>,
    /// Permissions of the socket file, in octal.
    #[arg(long, default_value = "600", value_name = "OCTAL", value_parser = parse_socket_mode)]
    pub socket_mode: u32,
    /// Format of the image; probed (qcow2 magic or raw) when not given, and then a probed raw
    /// image refuses writes that would change its probed format. Backing files use the format
    /// recorded in their overlay, raw when none is recorded.
    #[arg(long, value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Serve a throwaway qcow2 overlay over the image (like `qemu -snapshot`): the image is opened
    /// read-only and never written; the overlay is deleted at exit unless --keep-overlay.
    #[arg(long, conflicts_with = "readonly")]
    pub snapshot: bool,
    /// With --snapshot: create the overlay at PATH and keep it at exit.
    #[arg(long, value_name = "PATH", requires = "snapshot")]
    pub keep_overlay: Option<PathBuf>,
    /// Crash journal: every write is recorded in this file (host page cache, not synced)
    /// before it completes, and a daemon started after a crash replays what was not flushed
    /// before it serves. Default: SOCKET.journal, except with --readonly or a throwaway
    /// --snapshot overlay (with --keep-overlay the journal belongs to the kept overlay: restart
    /// with --image KEPT); `none` turns it off.
    #[arg(long, value_name = "PATH|none")]
    pub crash_journal: Option<PathBuf>,
    /// Memory for the folio cache (e.g. 64M, 1G).
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: u64,
    /// Dirty data allowed in the cache before writers wait for writeback (at most --cache-size).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = parse_size)]
    pub dirty_limit: u64,
    /// Folio size of the cache (power of two, 4K..2M).
    #[arg(long, default_value = "64K", value_name = "SIZE", value_parser = parse_size)]
    pub folio_size: u64,
    /// Confine every backing file of the chain to this directory tree (repeatable; checked after
    /// resolving symlinks). Without it backing files may be any regular file outside /proc, /sys.
    #[arg(long = "allow-backing", value_name = "DIR")]
    pub allow_backing: Vec<PathBuf>,
    /// With --allow-backing: also allow the NBD server HOST:PORT (TCP) as a backing image
    /// (repeatable). Unix-socket NBD servers are allowed by their socket's directory instead.
    #[arg(long = "allow-nbd", value_name = "HOST:PORT")]
    pub allow_nbd: Vec<String>,
    /// Most connections to each NBD backing export (cold reads in flight at once).
    #[arg(long, default_value_t = 16, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nbd_connections: u16,
    /// Seconds one read of an NBD backing export may take (waiting for a connection,
    /// reconnecting, the read itself) before it fails with an I/O error.
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = parse_nbd_timeout)]
    pub nbd_timeout: f64,
    /// Probe the format (qcow2 magic or raw) of backing files whose overlay does not record it,
    /// instead of opening them as raw. Only for images you trust.
    #[arg(long)]
    pub probe_backing_format: bool,
    /// Drop root to USER (and GROUP, default USER's group) once the socket and every image of the
    /// chain are open.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// System-call filter of the serving daemon: kill (a forbidden call kills the daemon with a
    /// log line naming it), log (allowed but logged by the kernel's audit log), off.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill, value_name = "MODE")]
    pub seccomp: SeccompMode,
    /// Serve the JSON control protocol (status, stats, flush, cache mode, live snapshots) on
    /// this unix socket (owner-only); see `snapblk ctl`.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics: HOST:PORT or unix:PATH (off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::metrics_http::MetricsAddr>,
}

/// What the daemon's system-call filter does with a call outside the allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// Kill the daemon, with a log line naming the system call.
    Kill,
    /// Allow the call and have the kernel log it (audit log / dmesg); for finding missing calls.
    Log,
    /// No filter.
    Off,
}

impl ServeArgs {
    /// Arguments with every option at its default, for tests and embedding.
    pub fn with_defaults(image: PathBuf, socket: PathBuf) -> Self {
        ServeArgs {
            image,
            socket,
            readonly: false,
            num_queues: 1,
            queue_size: 256,
            serial: None,
            logical_block_size: 512,
            cache: CacheMode::Writeback,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            aio: AioMode::IoUring,
            direct: DirectMode::Auto,
            io_threads: None,
            socket_mode: 0o600,
            format: None,
            snapshot: false,
            keep_overlay: None,
            crash_journal: None,
            cache_size: 256 << 20,
            dirty_limit: 64 << 20,
            folio_size: 64 << 10,
            allow_backing: Vec::new(),
            allow_nbd: Vec::new(),
            nbd_connections: 16,
            nbd_timeout: 30.0,
            probe_backing_format: false,
            user: None,
            seccomp: SeccompMode::Kill,
            control_socket: None,
            metrics: None,
        }
    }
}

/// Parses `--nbd-timeout`: seconds, more than 0 and at most a day.
fn parse_nbd_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

impl ServeArgs {
    /// The NBD client settings these arguments ask for.
    pub fn nbd_options(&self) -> nbd_client::NbdOptions {
        nbd_client::NbdOptions {
            connections: usize::from(self.nbd_connections),
            timeout: std::time::Duration::from_secs_f64(self.nbd_timeout),
            ..nbd_client::NbdOptions::default()
        }
    }
}

/// Parses `--queue-size`: a power of two in `MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE`.
pub fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if !n.is_power_of_two() || !(MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&n) {
        return Err(format!(
            "must be a power of two between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE}"
        ));
    }
    Ok(n)
}

/// Parses `--logical-block-size`: a power of two in 512..=4096.
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if !n.is_power_of_two() || !(512..=4096).contains(&n) {
        return Err("must be a power of two between 512 and 4096".to_string());
    }
    Ok(n)
}

impl ServeArgs {
    /// The in-flight bound per queue: `--max-inflight`, or the deprecated `--io-threads` + 1.
    /// Where the crash journal lives, if there is one (see `--crash-journal`).
    pub fn effective_crash_journal(&self) -> Option<PathBuf> {
        match &self.crash_journal {
            _ if self.readonly => None,
            Some(p) if p.as_os_str() == "none" => None,
            Some(p) => Some(p.clone()),
            // A throwaway overlay dies with the daemon: nothing to replay into.
            None if self.snapshot && self.keep_overlay.is_none() => None,
            None => {
                let mut p = self.socket.clone().into_os_string();
                p.push(".journal");
                Some(PathBuf::from(p))
            }
        }
    }

    pub fn effective_max_inflight(&self) -> usize {
        match self.io_threads {
            Some(n) => n + 1,
            None => self.max_inflight,
        }
    }
}

/// Parses `--max-inflight`: 1..=`MAX_INFLIGHT`.
pub fn parse_max_inflight(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if !(1..=MAX_INFLIGHT).contains(&n) {
        return Err(format!("must be between 1 and {MAX_INFLIGHT}"));
    }
    Ok(n)
}

/// Parses `--serial`: at most 20 bytes.
pub fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > crate::virtio_blk::VIRTIO_BLK_ID_BYTES {
        return Err(format!(
            "at most {} bytes (got {})",
            crate::virtio_blk::VIRTIO_BLK_ID_BYTES,
            s.len()
        ));
    }
    Ok(s.to_string())
}

/// Parses `--io-threads`: at most `MAX_IO_THREADS`.
pub fn parse_io_threads(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if n > MAX_IO_THREADS {
        return Err(format!("at most {MAX_IO_THREADS}"));
    }
    Ok(n)
}

/// Parses `--socket-mode`: octal permission bits, at most 0777.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8).map_err(|e| format!("not an octal number: {e}"))?;
    if mode > 0o777 {
        return Err("only permission bits (at most 0777) are allowed".to_string());
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(cli: Cli) -> ServeArgs {
        #[allow(unreachable_patterns)]
        match cli.command {
            Command::Serve(args) => args,
            _ => panic!("not the serve subcommand"),
        }
    }

    #[test]
    fn serve_defaults_are_one_queue_256_entries_512_bytes_writeback_0600() {
        let cli =
            Cli::try_parse_from(["snapblk", "serve", "--image", "a.img", "--socket", "s"]).unwrap();
        let args = serve_args(cli);
        assert_eq!(args.num_queues, 1);
        assert_eq!(args.queue_size, 256);
        assert_eq!(args.logical_block_size, 512);
        assert_eq!(args.cache, CacheMode::Writeback);
        assert_eq!(args.socket_mode, 0o600);
        assert_eq!(args.effective_max_inflight(), DEFAULT_MAX_INFLIGHT);
        assert!(!args.readonly);
        assert!(args.serial.is_none());
    }

    #[test]
    fn serve_rejects_out_of_range_values() {
        let base = ["snapblk", "serve", "--image", "a", "--socket", "s"];
        for extra in [
            &["--num-queues", "0"][..],
            &["--num-queues", "17"],
            &["--queue-size", "100"],
            &["--queue-size", "2048"],
            &["--logical-block-size", "1000"],
            &["--logical-block-size", "8192"],
            &["--serial", "123456789012345678901"],
            &["--socket-mode", "1777"],
            &["--socket-mode", "9"],
            &["--cache", "none"],
            &["--io-threads", "65"],
            &["--max-inflight", "0"],
            &["--max-inflight", "1025"],
            &["--max-inflight", "4", "--io-threads", "2"],
        ] {
            let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
            assert!(Cli::try_parse_from(&args).is_err(), "accepted {extra:?}");
        }
    }

    #[test]
    fn serve_confinement_flags_default_to_seccomp_kill_and_parse_repeated_allow_backing() {
        let base = ["snapblk", "serve", "--image", "a", "--socket", "s"];
        let args = serve_args(Cli::try_parse_from(base).unwrap());
        assert_eq!(args.seccomp, SeccompMode::Kill);
        assert!(args.user.is_none() && args.allow_backing.is_empty());
        assert!(!args.probe_backing_format);
        let extra = [
            "--allow-backing",
            "/a",
            "--allow-backing",
            "/b",
            "--user",
            "nobody:nogroup",
            "--seccomp",
            "log",
            "--probe-backing-format",
        ];
        let all: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let args = serve_args(Cli::try_parse_from(&all).unwrap());
        assert_eq!(
            args.allow_backing,
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(args.user.as_deref(), Some("nobody:nogroup"));
        assert_eq!(args.seccomp, SeccompMode::Log);
        assert!(args.probe_backing_format);
        let bad: Vec<&str> = base
            .iter()
            .chain(["--seccomp", "trap"].iter())
            .copied()
            .collect();
        assert!(Cli::try_parse_from(&bad).is_err());
    }

    #[test]
    fn serve_accepts_all_flags() {
        let cli = Cli::try_parse_from([
            "snapblk",
            "serve",
            "--image",
            "a",
            "--socket",
            "s",
            "--readonly",
            "--num-queues",
            "4",
            "--queue-size",
            "1024",
            "--serial",
            "12345678901234567890",
            "--logical-block-size",
            "4096",
            "--cache",
            "writethrough",
            "--socket-mode",
            "660",
            "--max-inflight",
            "1",
        ])
        .unwrap();
        let args = serve_args(cli);
        assert!(args.readonly);
        assert_eq!(args.num_queues, 4);
        assert_eq!(args.queue_size, 1024);
        assert_eq!(args.serial.as_deref(), Some("12345678901234567890"));
        assert_eq!(args.logical_block_size, 4096);
        assert_eq!(args.cache, CacheMode::Writethrough);
        assert_eq!(args.socket_mode, 0o660);
        assert_eq!(args.effective_max_inflight(), 1);
    }

    #[test]
    fn deprecated_io_threads_counts_the_queue_thread_in_the_inflight_bound() {
        let cli = Cli::try_parse_from([
            "snapblk",
            "serve",
            "--image",
            "a",
            "--socket",
            "s",
            "--io-threads",
            "2",
        ])
        .unwrap();
        assert_eq!(serve_args(cli).effective_max_inflight(), 3);
    }

    #[test]
    fn direct_is_auto_unless_asked_and_takes_only_auto_large_on_or_off() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["snapblk", "serve", "--image", "a", "--socket", "s"];
            v.extend_from_slice(extra);
            Cli::try_parse_from(v)
        };
        assert_eq!(serve_args(parse(&[]).unwrap()).direct, DirectMode::Auto);
        for (arg, mode) in [
            ("auto", DirectMode::Auto),
            ("on", DirectMode::On),
            ("off", DirectMode::Off),
            ("large", DirectMode::Large),
        ] {
            assert_eq!(serve_args(parse(&["--direct", arg]).unwrap()).direct, mode);
        }
        assert!(parse(&["--direct", "yes"]).is_err());
    }

    #[test]
    fn auto_direct_is_on_for_extended_l2_tops_and_large_for_the_others() {
        assert_eq!(DirectMode::Auto.for_top(true), DirectMode::On);
        assert_eq!(DirectMode::Auto.for_top(false), DirectMode::Large);
        for m in [DirectMode::On, DirectMode::Large, DirectMode::Off] {
            assert_eq!(m.for_top(true), m);
            assert_eq!(m.for_top(false), m);
        }
    }

    #[test]
    fn the_crash_journal_sits_next_to_the_socket_unless_nothing_could_be_replayed() {
        let mut a = ServeArgs::with_defaults("img".into(), "/run/vm.sock".into());
        assert_eq!(
            a.effective_crash_journal(),
            Some(PathBuf::from("/run/vm.sock.journal"))
        );
        a.crash_journal = Some("/var/j".into());
        assert_eq!(a.effective_crash_journal(), Some(PathBuf::from("/var/j")));
        a.crash_journal = Some("none".into());
        assert_eq!(a.effective_crash_journal(), None);
        a.crash_journal = None;
        a.snapshot = true;
        assert_eq!(a.effective_crash_journal(), None, "throwaway overlay");
        a.keep_overlay = Some("kept.qcow2".into());
        assert!(a.effective_crash_journal().is_some(), "kept overlay");
        a.snapshot = false;
        a.keep_overlay = None;
        a.readonly = true;
        assert_eq!(a.effective_crash_journal(), None);
    }
}
