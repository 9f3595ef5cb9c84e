//! The image subcommands, in the style of `qemu-img`: `create`, `info`, `check`, `commit`,
//! `export` and `checksum`. Each is a thin shell over `qcow_snapshot`'s path-level operations;
//! long ones draw a progress bar when stderr is a terminal.
//!
//! Habits follow qemu-img: `-f/-F/-b/-o/-p/-q/-U` short flags, `create FILE SIZE`, qemu-img size
//! syntax, `info --output json [--backing-chain]`, exit 63 for `check` on raw. Output goes through
//! [`emit`], so a closed pipe ends a command quietly; every error is one line on stderr.
//!
//! Locking model: none in memory; each command opens its images (which takes QEMU-compatible
//! image locks, force-shared with `-U`), works, and closes them before returning.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use qcow_snapshot::check::{self, Repair};
use qcow_snapshot::{CreateOptions, Format};

use crate::img_size::{parse_image_size, round_up_to_sector};

/// Image format names accepted on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// A plain disk image, byte for byte.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// Arguments of `snapblk create` (`qemu-img create [-f FMT] [-b FILE -F FMT] [-o OPTS] [-q]
/// FILE [SIZE]`).
#[derive(Clone, Debug, Args)]
pub struct CreateArgs {
    /// Format of the new image (qcow2 by default; raw makes a sparse file).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Backing file of the new overlay (never written).
    #[arg(long, short = 'b', value_name = "FILE")]
    pub backing: Option<PathBuf>,
    /// Format of the backing file; required with --backing (a raw base is never probed).
    #[arg(long = "backing-format", short = 'F', value_enum, value_name = "FMT")]
    pub backing_format: Option<FormatArg>,
    /// Creation options like qemu-img: size=, cluster_size=, backing_file=, backing_fmt=,
    /// refcount_bits= (comma separated; may be repeated).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Virtual size (same as the positional SIZE).
    #[arg(long = "size", value_name = "SIZE", value_parser = parse_image_size)]
    pub size_flag: Option<u64>,
    /// Cluster size (512 bytes to 2M, a power of two).
    #[arg(long, value_name = "SIZE", value_parser = parse_image_size)]
    pub cluster_size: Option<u64>,
    /// 128-bit L2 entries with 32 subclusters per cluster (QEMU's `extended_l2=on`): a first
    /// write into a cluster allocates only the subclusters it touches. Needs a cluster size
    /// of at least 16K.
    #[arg(long = "extended-l2")]
    pub extended_l2: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The image file to create.
    #[arg(value_name = "FILE")]
    pub overlay: PathBuf,
    /// Virtual size like qemu-img (1.5G, 512M, 10G, plain bytes; rounded up to 512 bytes);
    /// defaults to the backing file's size.
    #[arg(value_name = "SIZE", value_parser = parse_image_size)]
    pub size: Option<u64>,
}

/// How a command reads its source image (`-f FMT`, `-U`).
#[derive(Clone, Debug, Args)]
pub struct SourceArgs {
    /// Read the image as this format instead of probing it.
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Open force-shared (read-only, without conflicting locks), like qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

impl SourceArgs {
    /// The format to read the image as (probed when `None`).
    pub fn format(&self) -> Option<Format> {
        self.format.map(Format::from)
    }

    /// Runs `f` force-shared when `-U` was given.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.force_share {
            blockdev::lock::with_force_share(f)
        } else {
            f()
        }
    }
}

/// Arguments of `snapblk info`.
#[derive(Clone, Debug, Args)]
pub struct InfoArgs {
    /// How the image is read.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output format: human or json (qemu-img's field names).
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    pub output: String,
    /// Describe every image of the backing chain, top first.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// The image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// What `snapblk check --repair` may fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Only leaked clusters (refcounts that are too high).
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// Arguments of `snapblk check`.
#[derive(Clone, Debug, Args)]
pub struct CheckArgs {
    /// Read the image as this format instead of probing it (raw cannot be checked: exit 63).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Repair what was found.
    #[arg(long, short = 'r', value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairArg>,
    /// Open force-shared (read-only; not with --repair), like qemu-img -U.
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    pub force_share: bool,
    /// Quiet: no report on stdout, only the exit code.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Output format: human or json (like `qemu-img check --output`).
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    pub output: String,
    /// The qcow2 image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// Arguments of `snapblk commit`.
#[derive(Clone, Debug, Args)]
pub struct CommitArgs {
    /// Format of the overlay (must be qcow2).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The overlay whose data goes into its backing file; it is emptied afterwards.
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// Arguments of `snapblk export`.
#[derive(Clone, Debug, Args)]
pub struct ExportArgs {
    /// How the image is read.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The image (any format, with its backing chain).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The raw file to write (sparse where the disk reads zeros); never one of the inputs.
    #[arg(value_name = "OUT.raw")]
    pub out: PathBuf,
}

/// Arguments of `snapblk checksum`.
#[derive(Clone, Debug, Args)]
pub struct ChecksumArgs {
    /// How the image is read.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// The image (any format, with its backing chain).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// A progress bar on a terminal when asked for (`-p`), nothing otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(what: &str, wanted: bool) -> Self {
        if !wanted || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        Progress { bar: Some(bar) }
    }

    fn update(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One error line on stderr (newlines folded), exit 1.
fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    let msg = e.to_string().replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "snapblk {what}: {msg}");
    ExitCode::FAILURE
}

/// Writes `text` to stdout. A closed pipe is not an error worth a message (the reader went away,
/// as with `qemu-img info | head`); any other write error is.
fn emit(what: &str, text: &str) -> Result<(), ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ExitCode::from(141)),
        Err(e) => Err(fail(what, format!("cannot write the output: {e}"))),
    }
}

fn emit_code(what: &str, text: &str, code: ExitCode) -> ExitCode {
    match emit(what, text) {
        Ok(()) => code,
        Err(c) => c,
    }
}

/// The create options after merging `-o`, the flags and the positional size.
struct CreatePlan {
    format: Format,
    size: Option<u64>,
    cluster_size: u64,
    backing: Option<(PathBuf, Option<FormatArg>)>,
    refcount_order: Option<u32>,
    extended_l2: bool,
}

fn parse_format_name(v: &str) -> Result<FormatArg, String> {
    FormatArg::from_str(v, false).map_err(|_| format!("unknown format {v:?} (raw or qcow2)"))
}

fn plan_create(args: &CreateArgs) -> Result<CreatePlan, String> {
    let mut size = args.size.or(args.size_flag);
    if args.size.is_some() && args.size_flag.is_some() && args.size != args.size_flag {
        return Err("SIZE and --size disagree".to_string());
    }
    let mut cluster_size = args.cluster_size;
    let mut backing = args.backing.clone();
    let mut backing_format = args.backing_format;
    let mut refcount_order = None;
    let mut extended_l2 = args.extended_l2;
    for opt in args.options.iter().flat_map(|o| o.split(',')) {
        if opt.is_empty() {
            continue;
        }
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| format!("option {opt:?} needs a value (key=value)"))?;
        match k {
            "size" => size = Some(parse_image_size(v)?),
            "cluster_size" => cluster_size = Some(parse_image_size(v)?),
            "backing_file" => backing = Some(PathBuf::from(v)),
            "backing_fmt" => backing_format = Some(parse_format_name(v)?),
            "refcount_bits" => {
                let bits: u32 = v
                    .parse()
                    .map_err(|_| format!("invalid refcount_bits {v:?}"))?;
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(format!(
                        "refcount_bits must be a power of two up to 64, not {bits}"
                    ));
                }
                refcount_order = Some(bits.trailing_zeros());
            }
            "extended_l2" => {
                extended_l2 = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(format!("extended_l2 is on or off, not {v:?}")),
                }
            }
            other => return Err(format!("unsupported creation option {other:?}")),
        }
    }
    let format = args.format.map_or(Format::Qcow2, Format::from);
    if backing_format.is_some() && backing.is_none() {
        return Err("-F/--backing-format needs -b/--backing".to_string());
    }
    let size = size.map(round_up_to_sector).transpose()?;
    Ok(CreatePlan {
        format,
        size,
        cluster_size: cluster_size.unwrap_or(64 << 10),
        backing: backing.map(|b| (b, backing_format)),
        refcount_order,
        extended_l2,
    })
}

fn create_raw(path: &std::path::Path, size: u64) -> Result<(), String> {
    let file =
        qcow_snapshot::output::open_target(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.set_len(0)
        .and_then(|()| file.set_len(size))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `snapblk create`.
pub fn create(args: &CreateArgs) -> ExitCode {
    let plan = match plan_create(args) {
        Ok(p) => p,
        Err(e) => return fail("create", e),
    };
    if plan.format == Format::Raw {
        if plan.backing.is_some() {
            return fail("create", "a raw image cannot have a backing file");
        }
        let Some(size) = plan.size else {
            return fail("create", "a size is required for a raw image");
        };
        if let Err(e) = create_raw(&args.overlay, size) {
            return fail("create", e);
        }
        if args.quiet {
            return ExitCode::SUCCESS;
        }
        let line = format!(
            "Formatting '{}', fmt=raw size={size}\n",
            args.overlay.display()
        );
        return emit_code("create", &line, ExitCode::SUCCESS);
    }
    let backing = match &plan.backing {
        Some((path, Some(fmt))) => match path.to_str() {
            Some(name) => Some((name.to_string(), Format::from(*fmt))),
            None => return fail("create", "the backing file name is not valid UTF-8"),
        },
        Some((_, None)) => {
            return fail(
                "create",
                "--backing needs --backing-format raw|qcow2 (a backing file is never probed)",
            )
        }
        None => None,
    };
    if backing.is_none() && plan.size.is_none() {
        return fail("create", "a size is required without a backing file");
    }
    let mut opts = CreateOptions {
        size: plan.size.unwrap_or(0),
        cluster_size: plan.cluster_size,
        backing,
        extended_l2: plan.extended_l2,
        ..CreateOptions::default()
    };
    if let Some(order) = plan.refcount_order {
        opts.refcount_order = order;
    }
    if let Err(e) = qcow_snapshot::create(&args.overlay, &opts) {
        return fail("create", e);
    }
    if args.quiet {
        return ExitCode::SUCCESS;
    }
    match qcow_snapshot::info(&args.overlay) {
        Ok(info) => {
            let line = format!(
                "Formatting '{}', fmt=qcow2 cluster_size={} size={}\n",
                args.overlay.display(),
                plan.cluster_size,
                info.virtual_size
            );
            emit_code("create", &line, ExitCode::SUCCESS)
        }
        Err(e) => fail("create", e),
    }
}

/// `snapblk info`.
pub fn info(args: &InfoArgs) -> ExitCode {
    let fmt = args.source.format();
    let json = args.output == "json";
    let text = args.source.run(|| {
        if args.backing_chain {
            qcow_snapshot::info_chain(&args.image, fmt).map(|chain| {
                if json {
                    format!("{}\n", qcow_snapshot::info::chain_to_json(&chain))
                } else {
                    chain
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            })
        } else {
            qcow_snapshot::info_with(&args.image, fmt).map(|i| {
                if json {
                    format!("{}\n", i.to_json())
                } else {
                    let mut t = i.to_string();
                    t.push_str(&backing_chain_text(&args.image, &i));
                    t
                }
            })
        }
    });
    match text {
        Ok(t) => emit_code("info", &t, ExitCode::SUCCESS),
        Err(e) => fail("info", e),
    }
}

/// Lists every backing file of `image` with its resolved path, the format it is opened with and
/// the default backing policy's verdict, so a user can look at a chain before serving it.
fn backing_chain_text(image: &std::path::Path, info: &qcow_snapshot::ImageInfo) -> String {
    if info.backing_file.is_none() {
        return String::new();
    }
    let policy = qcow_snapshot::BackingPolicy::default();
    let mut out = String::from("Backing chain:\n");
    for (i, entry) in qcow_snapshot::policy::describe_chain(image, &policy)
        .iter()
        .enumerate()
    {
        out.push_str(&format!("    {}: {entry}\n", i + 1));
    }
    out
}

/// `qemu-img check`'s exit code for a format without checks.
pub const EXIT_CHECK_UNSUPPORTED: u8 = 63;

/// `snapblk check`: exit 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 the format has
/// no checks (raw) (as `qemu-img check`).
pub fn check(args: &CheckArgs) -> ExitCode {
    let fmt = match args.format {
        Some(f) => Format::from(f),
        None => match qcow_snapshot::probe_format(&args.image) {
            Ok(f) => f,
            Err(e) => return fail("check", e),
        },
    };
    if fmt == Format::Raw {
        let _ = writeln!(
            std::io::stderr(),
            "snapblk check: This image format does not support checks"
        );
        return ExitCode::from(EXIT_CHECK_UNSUPPORTED);
    }
    let repair = args.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    let check_it = || check::check(&args.image, repair);
    let result = if args.force_share {
        blockdev::lock::with_force_share(check_it)
    } else {
        check_it()
    };
    match result {
        Ok(report) => {
            let code = ExitCode::from(report.exit_code() as u8);
            if args.quiet {
                return code;
            }
            if args.output == "json" {
                let text = format!("{}\n", report.to_json(&args.image.to_string_lossy()));
                emit_code("check", &text, code)
            } else {
                let mut err = std::io::stderr().lock();
                for m in report.repair_messages.iter().chain(&report.messages) {
                    let _ = writeln!(err, "{m}");
                }
                emit_code("check", &report.to_string(), code)
            }
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "snapblk check: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `snapblk commit`.
pub fn commit(args: &CommitArgs) -> ExitCode {
    if args.format == Some(FormatArg::Raw) {
        return fail("commit", "a raw image has no backing file to commit into");
    }
    let mut p = Progress::new("commit", args.progress);
    let r = qcow_snapshot::commit(&args.overlay, &mut |d, t| p.update(d, t));
    p.finish();
    match r {
        Ok(()) if args.quiet => ExitCode::SUCCESS,
        Ok(()) => emit_code("commit", "Image committed.\n", ExitCode::SUCCESS),
        Err(e) => fail("commit", e),
    }
}

/// `snapblk export`.
pub fn export(args: &ExportArgs) -> ExitCode {
    let mut p = Progress::new("export", args.progress);
    let fmt = args.source.format();
    let r = args
        .source
        .run(|| qcow_snapshot::export(&args.image, fmt, &args.out, &mut |d, t| p.update(d, t)));
    p.finish();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("export", e),
    }
}

/// `snapblk checksum`: prints `SHA256  IMAGE` like `sha256sum`.
pub fn checksum(args: &ChecksumArgs) -> ExitCode {
    let mut p = Progress::new("checksum", args.progress);
    let fmt = args.source.format();
    let r = args.source.run(|| {
        qcow_snapshot::open_image(&args.image, fmt, true)
            .map_err(qcow_snapshot::ImageOpError::from)
            .and_then(|dev| qcow_snapshot::checksum_dev(&*dev, &mut |d, t| p.update(d, t)))
    });
    p.finish();
    match r {
        Ok(sum) => {
            let line = format!("{sum}  {}\n", args.image.display());
            emit_code("checksum", &line, ExitCode::SUCCESS)
        }
        Err(e) => fail("checksum", e),
    }
}
