//! The image subcommands, in the style of `qemu-img`: `create`, `info`, `check`, `commit`,
//! `export` and `checksum`. Each is a thin shell over `qcow_snapshot`'s path-level operations;
//! long ones draw a progress bar when stderr is a terminal.
//!
//! Locking model: none; each command opens its images, works, and closes them before returning.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use qcow_snapshot::check::{self, Repair};
use qcow_snapshot::{CreateOptions, Format};

use cache::parse_size;

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

/// Arguments of `snapblk create`.
#[derive(Clone, Debug, Args)]
pub struct CreateArgs {
    /// Backing file of the new overlay (never written).
    #[arg(long, short = 'b', value_name = "FILE")]
    pub backing: Option<PathBuf>,
    /// Format of the backing file; required with --backing (a raw base is never probed).
    #[arg(
        long = "backing-format",
        short = 'F',
        value_enum,
        value_name = "FMT",
        requires = "backing"
    )]
    pub backing_format: Option<FormatArg>,
    /// Virtual size (e.g. 10G, 512M); defaults to the backing file's size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Cluster size (512 bytes to 2M, a power of two).
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
    pub cluster_size: u64,
    /// 128-bit L2 entries with 32 subclusters per cluster (QEMU's `extended_l2=on`): a first
    /// write into a cluster allocates only the subclusters it touches. Needs a cluster size
    /// of at least 16K.
    #[arg(long = "extended-l2")]
    pub extended_l2: bool,
    /// The qcow2 file to create.
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// Arguments of `snapblk info`.
#[derive(Clone, Debug, Args)]
pub struct InfoArgs {
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
    /// Repair what was found.
    #[arg(long, short = 'r', value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairArg>,
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
    /// The overlay whose data goes into its backing file; it is emptied afterwards.
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// Arguments of `snapblk export`.
#[derive(Clone, Debug, Args)]
pub struct ExportArgs {
    /// The image (any format, with its backing chain).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The raw file to write (sparse where the disk reads zeros).
    #[arg(value_name = "OUT.raw")]
    pub out: PathBuf,
}

/// Arguments of `snapblk checksum`.
#[derive(Clone, Debug, Args)]
pub struct ChecksumArgs {
    /// The image (any format, with its backing chain).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
}

/// A progress bar on a terminal, nothing otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(what: &str) -> Self {
        if !std::io::stderr().is_terminal() {
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

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("snapblk {what}: {e}");
    ExitCode::FAILURE
}

/// `snapblk create`.
pub fn create(args: &CreateArgs) -> ExitCode {
    let backing = match (&args.backing, args.backing_format) {
        (Some(path), Some(fmt)) => match path.to_str() {
            Some(name) => Some((name.to_string(), Format::from(fmt))),
            None => return fail("create", "the backing file name is not valid UTF-8"),
        },
        (Some(_), None) => {
            return fail(
                "create",
                "--backing needs --backing-format raw|qcow2 (a backing file is never probed)",
            )
        }
        _ => None,
    };
    if backing.is_none() && args.size.is_none() {
        return fail("create", "--size is required without --backing");
    }
    let opts = CreateOptions {
        size: args.size.unwrap_or(0),
        cluster_size: args.cluster_size,
        backing,
        extended_l2: args.extended_l2,
        ..CreateOptions::default()
    };
    match qcow_snapshot::create(&args.overlay, &opts) {
        Ok(()) => match qcow_snapshot::info(&args.overlay) {
            Ok(info) => {
                println!(
                    "Formatting '{}', fmt=qcow2 cluster_size={} size={}",
                    args.overlay.display(),
                    args.cluster_size,
                    info.virtual_size
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail("create", e),
        },
        Err(e) => fail("create", e),
    }
}

/// `snapblk info`.
pub fn info(args: &InfoArgs) -> ExitCode {
    match qcow_snapshot::info(&args.image) {
        Ok(info) => {
            print!("{info}");
            print_backing_chain(&args.image, &info);
            ExitCode::SUCCESS
        }
        Err(e) => fail("info", e),
    }
}

/// Lists every backing file of `image` with its resolved path, the format it is opened with and
/// the default backing policy's verdict, so a user can look at a chain before serving it.
fn print_backing_chain(image: &std::path::Path, info: &qcow_snapshot::ImageInfo) {
    if info.backing_file.is_none() {
        return;
    }
    let policy = qcow_snapshot::BackingPolicy::default();
    println!("Backing chain:");
    for (i, entry) in qcow_snapshot::policy::describe_chain(image, &policy)
        .iter()
        .enumerate()
    {
        println!("    {}: {entry}", i + 1);
    }
}

/// `snapblk check`: exit 0 clean, 1 check failed, 2 corruptions, 3 leaks only (as `qemu-img check`).
pub fn check(args: &CheckArgs) -> ExitCode {
    let repair = args.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    match check::check(&args.image, repair) {
        Ok(report) => {
            if args.output == "json" {
                println!("{}", report.to_json(&args.image.to_string_lossy()));
            } else {
                for m in report.repair_messages.iter().chain(&report.messages) {
                    eprintln!("{m}");
                }
                print!("{report}");
            }
            ExitCode::from(report.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("snapblk check: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `snapblk commit`.
pub fn commit(args: &CommitArgs) -> ExitCode {
    let mut p = Progress::new("commit");
    let r = qcow_snapshot::commit(&args.overlay, &mut |d, t| p.update(d, t));
    p.finish();
    match r {
        Ok(()) => {
            println!("Image committed.");
            ExitCode::SUCCESS
        }
        Err(e) => fail("commit", e),
    }
}

/// `snapblk export`.
pub fn export(args: &ExportArgs) -> ExitCode {
    let mut p = Progress::new("export");
    let r = qcow_snapshot::export(&args.image, &args.out, &mut |d, t| p.update(d, t));
    p.finish();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("export", e),
    }
}

/// `snapblk checksum`: prints `SHA256  IMAGE` like `sha256sum`.
pub fn checksum(args: &ChecksumArgs) -> ExitCode {
    let mut p = Progress::new("checksum");
    let r = qcow_snapshot::checksum(&args.image, &mut |d, t| p.update(d, t));
    p.finish();
    match r {
        Ok(sum) => {
            println!("{sum}  {}", args.image.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail("checksum", e),
    }
}
