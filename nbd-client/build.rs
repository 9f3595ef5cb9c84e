// Links the system libnbd (Debian: libnbd-dev, installed by scripts/install-deps.sh).
fn main() {
    println!("cargo:rustc-link-lib=dylib=nbd");
    println!("cargo:rerun-if-changed=build.rs");
}
