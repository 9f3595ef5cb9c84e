//! `snapblk convert`: qemu-img style conversion of any image snapblk reads into a standalone
//! raw or qcow2 (optionally compressed) image. The work is in [`qcow_snapshot::convert`].
//!
//! Locking model: none (a one-shot command).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use qcow_snapshot::convert::{convert, ConvertOptions, OutputFormat};
use qcow_snapshot::format::CompressionType;

use crate::image_cmd::FormatArg;

/// Output format of `snapblk convert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    /// A raw file (sparse where the disk reads zeros).
    Raw,
    /// A standalone qcow2 image.
    Qcow2,
}

/// Arguments of `snapblk convert`.
#[derive(Clone, Debug, Args)]
pub struct ConvertArgs {
    /// Format of the source (default: qcow2 if it has the qcow2 magic, else raw).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub src_format: Option<FormatArg>,
    /// Output format.
    #[arg(short = 'O', value_enum, value_name = "FMT", default_value = "qcow2")]
    pub output: OutputArg,
    /// Write compressed clusters (qcow2 output).
    #[arg(short = 'c')]
    pub compress: bool,
    /// qcow2 output options: compression_type=zlib|zstd, cluster_size=SIZE, extended_l2=on|off.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Compression threads (default: one per CPU).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// The source image (any format, with its backing chain).
    #[arg(value_name = "SRC")]
    pub src: PathBuf,
    /// The new image (never the source or a file of its backing chain).
    #[arg(value_name = "DST")]
    pub dst: PathBuf,
}

fn parse_options(args: &ConvertArgs, opts: &mut ConvertOptions) -> Result<(), String> {
    for list in &args.options {
        for kv in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("option '{kv}' needs a value (key=value)"))?;
            match k {
                "compression_type" => {
                    opts.compression_type = match v {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => {
                            return Err(format!("compression_type must be zlib or zstd, not '{v}'"))
                        }
                    }
                }
                "cluster_size" => {
                    opts.cluster_size =
                        cache::parse_size(v).map_err(|e| format!("cluster_size: {e}"))?
                }
                "extended_l2" => {
                    opts.extended_l2 = match v {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(format!("extended_l2 must be on or off, not '{v}'")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown option '{k}' (compression_type, cluster_size, extended_l2)"
                    ))
                }
            }
        }
    }
    if opts.output == OutputFormat::Raw && !args.options.is_empty() {
        return Err("-o options need -O qcow2".into());
    }
    Ok(())
}

/// `snapblk convert`.
pub fn run(args: &ConvertArgs) -> ExitCode {
    let mut opts = ConvertOptions {
        src_format: args.src_format.map(Into::into),
        output: match args.output {
            OutputArg::Raw => OutputFormat::Raw,
            OutputArg::Qcow2 => OutputFormat::Qcow2,
        },
        compress: args.compress,
        threads: args.threads,
        ..ConvertOptions::default()
    };
    if let Err(e) = parse_options(args, &mut opts) {
        eprintln!("snapblk convert: {e}");
        return ExitCode::FAILURE;
    }
    let mut last = u64::MAX;
    let mut progress = |done: u64, total: u64| {
        if !args.progress {
            return;
        }
        let pct = (done * 10000).checked_div(total).unwrap_or(10000);
        if pct != last {
            last = pct;
            eprint!("    ({:.2}/100%)\r", pct as f64 / 100.0);
            let _ = std::io::stderr().flush();
        }
    };
    let r = convert(&args.src, &args.dst, &opts, &mut progress);
    if args.progress {
        eprintln!();
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapblk convert: {e}");
            ExitCode::FAILURE
        }
    }
}
