//! The `rstmdb` binary; everything lives in the library (`rstmdb::daemon`),
//! so that fuzz targets and tests can reach the protocol and request layers.

fn main() -> std::process::ExitCode {
    rstmdb::daemon::main()
}
