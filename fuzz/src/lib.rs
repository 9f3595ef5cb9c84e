//! Harnesses behind snapblk's cargo-fuzz targets, kept in a library so that the same code runs
//! under libFuzzer (`fuzz_targets/*.rs`, one line each) and as plain regression tests over the
//! committed corpora (`cargo test` in this directory replays `corpus/<target>/*`).
//!
//! - [`chain`]: arbitrary split-virtqueue contents (descriptor tables, avail ring, request
//!   headers, indirect tables) processed by the backend's request executor over a `MemDisk`.
//! - [`qcow`]: hostile qcow2 images opened by the engine, then one read, one write, a flush and
//!   the independent `check`.
//! - [`cacheops`]: an op sequence against a tiny `FolioCache`, compared with a shadow copy.
//!
//! Each harness decodes its input with [`Reader`], which never fails: missing bytes read as
//! zeros, so every input is a valid (if short) program. The matching encoders used to build the
//! seed corpora live next to the decoders so the two cannot drift apart.
//!
//! Locking model: none; each harness call owns everything it builds.

pub mod cacheops;
pub mod chain;
pub mod qcow;

/// Little-endian cursor over fuzzer bytes; reads past the end yield zeros.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// The unread rest.
    pub fn rest(&mut self) -> &'a [u8] {
        let all = self.data;
        self.data = &[];
        all
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.bytes(N);
        out[..src.len()].copy_from_slice(src);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Builds inputs in the format [`Reader`] decodes (for seed corpora and tests).
#[derive(Debug, Default, Clone)]
pub struct Writer {
    /// The bytes so far.
    pub out: Vec<u8>,
}

impl Writer {
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }

    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }
}

#[cfg(test)]
mod corpus_replay {
    use std::path::Path;

    fn replay(target: &str, run: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            run(&data);
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", dir.display());
    }

    #[test]
    fn virtio_blk_chain_corpus_replays_without_panic() {
        replay("virtio_blk_chain", crate::chain::run);
    }

    #[test]
    fn qcow2_image_corpus_replays_without_panic() {
        replay("qcow2_image", crate::qcow::run);
    }

    #[test]
    fn cache_ops_corpus_replays_and_matches_shadow() {
        replay("cache_ops", crate::cacheops::run);
    }
}
