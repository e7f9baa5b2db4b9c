//! Regenerates the checked-in Rust code of `driver/proto` from its `.proto` files:
//! `cargo run -p blockgate-proto-codegen`. The protos are compiled with protox, so no
//! `protoc` is needed. With `--check` it generates into a temporary directory and fails when
//! the checked-in code differs (CI runs this).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const FILES: [&str; 4] = [
    "csi/csi.proto",
    "blockgate/blockstore.proto",
    "blockgate/gateway.proto",
    "blockgate/control.proto",
];

fn generate(protos: &Path, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let descriptors = protox::compile(FILES, [protos]).context("compile protos")?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Clients are built from a Channel (`new`); a generated `connect` constructor would
        // clash with the control channel's `Connect` rpc.
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .compile_fds(descriptors)
        .context("generate Rust code")
}

fn files_in(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        files.push((name, bytes));
    }
    files.sort();
    Ok(files)
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("codegen crate has no parent directory")?
        .to_path_buf();
    let protos = root.join("proto");
    let checked_in = root.join("src").join("gen");
    if std::env::args().any(|a| a == "--check") {
        let scratch = std::env::temp_dir().join(format!("blockgate-proto-{}", std::process::id()));
        generate(&protos, &scratch)?;
        let fresh = files_in(&scratch)?;
        std::fs::remove_dir_all(&scratch).ok();
        let current = files_in(&checked_in)?;
        if fresh != current {
            bail!(
                "{} is stale: run `cargo run -p blockgate-proto-codegen` and commit the result",
                checked_in.display()
            );
        }
        println!("{} is current", checked_in.display());
        return Ok(());
    }
    generate(&protos, &checked_in)?;
    println!("generated code in {}", checked_in.display());
    Ok(())
}
