//! Writes `crds/*.yaml` from the custom resource types: `cargo run -p blockgate-operator-api
//! --bin crdgen`. With `--check` it writes nothing and fails when a checked-in file differs
//! from what it would write (CI runs this). Files it does not generate, such as
//! `crds/examples/`, are never touched.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const STALE: &str = "crds/ is stale: run `cargo run -p blockgate-operator-api --bin crdgen`";

fn crds_dir() -> PathBuf {
    // operator/api -> repository root.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds")
}

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: crdgen [--check]");
            return ExitCode::from(2);
        }
    };
    let files = match blockgate_operator_api::crd::render() {
        Ok(files) => files,
        Err(error) => {
            eprintln!("error: {error}: {}", error.source);
            return ExitCode::FAILURE;
        }
    };
    let dir = crds_dir();
    if check {
        let stale: Vec<&str> = files
            .iter()
            .filter(|(file, yaml)| {
                std::fs::read_to_string(dir.join(file)).ok().as_deref() != Some(yaml.as_str())
            })
            .map(|(file, _)| *file)
            .collect();
        if stale.is_empty() {
            println!("crds/ is current");
            return ExitCode::SUCCESS;
        }
        eprintln!("{STALE} (differs: {})", stale.join(", "));
        return ExitCode::FAILURE;
    }
    if let Err(error) = std::fs::create_dir_all(&dir) {
        eprintln!("error: create {}: {error}", dir.display());
        return ExitCode::FAILURE;
    }
    for (file, yaml) in &files {
        let path = dir.join(file);
        if let Err(error) = std::fs::write(&path, yaml) {
            eprintln!("error: write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote crds/{file}");
    }
    ExitCode::SUCCESS
}
