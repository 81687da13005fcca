//! A real netstatfs mount of the built binary (the mount itself is
//! `testkit`'s, shared with the benchmark harness): the tests' defaults, a
//! short cache TTL and this build's binary.

use std::ops::{Deref, DerefMut};
use std::path::Path;

pub const BINARY: &str = env!("CARGO_BIN_EXE_netstatfs");

pub struct Mount(testkit::Mount);

impl Mount {
    /// Mounts with a short cache TTL (tests wait for changes to show) plus
    /// `args`, and waits until the mount answers.
    pub fn start(args: &[&str]) -> Mount {
        let mut all = vec!["--cache-ttl", "100ms"];
        all.extend_from_slice(args);
        Self::start_exact(&all)
    }

    /// Mounts with exactly `args` (before the mountpoint).
    pub fn start_exact(args: &[&str]) -> Mount {
        Self::start_wrapped(&[], args)
    }

    /// Mounts with the daemon started through `wrapper` (e.g. setpriv).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Mount {
        Mount(testkit::Mount::launch(
            Path::new(BINARY),
            wrapper,
            None,
            args,
        ))
    }

    /// Mounts as another user, with `binary` (a copy that may carry file
    /// capabilities), on a mountpoint that user owns.
    pub fn start_as(uid: u32, gid: u32, binary: &Path, args: &[&str]) -> Mount {
        let wrapper = [
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
        ];
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut all = vec!["--cache-ttl", "100ms"];
        all.extend_from_slice(args);
        Mount(testkit::Mount::launch(
            binary,
            &wrapper,
            Some((uid, gid)),
            &all,
        ))
    }
}

impl Deref for Mount {
    type Target = testkit::Mount;
    fn deref(&self) -> &testkit::Mount {
        &self.0
    }
}

impl DerefMut for Mount {
    fn deref_mut(&mut self) -> &mut testkit::Mount {
        &mut self.0
    }
}
