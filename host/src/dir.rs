//! A directory handle whose files are opened beneath it, never outside it.
//!
//! The loader reads its configuration, policy, programs, signatures and sealed
//! models by paths that files name (`worlds = "…"`, `path = "…"`). Each is
//! opened relative to the configuration's directory with Linux's `openat2`
//! and `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel refuses `..` past
//! the directory, absolute paths and symbolic links that lead out of it (EXDEV),
//! atomically, while the path is resolved. This is what `cap-std` does on
//! Linux; it is written here on `rustix` (already in the loader through
//! wasmtime) to keep cap-std's nine crates out of the trusted computing base.
//! Needs Linux 5.6 or later (`openat2`); older kernels get ENOSYS, never a
//! silent fallback to an unconfined open.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// An open directory; files are opened beneath it (see the module docs).
#[derive(Debug)]
pub struct Dir(OwnedFd);

impl Dir {
    /// Opens the directory at `path` with the process's ambient authority.
    pub fn open_ambient(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self(fd))
    }

    /// Opens the regular file `path` (relative, beneath this directory) to read.
    pub fn open(&self, path: impl AsRef<Path>) -> io::Result<File> {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        // NONBLOCK: a FIFO is refused below instead of blocking the open.
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        // EAGAIN: a rename elsewhere raced the lookup; the kernel asks for a retry.
        let mut tries = 0;
        let fd = loop {
            match rustix::fs::openat2(&self.0, path.as_ref(), flags, Mode::empty(), how) {
                Err(Errno::AGAIN) if tries < 8 => tries += 1,
                r => break r?,
            }
        };
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(file)
    }

    /// The contents of the file `path` beneath this directory.
    pub fn read(&self, path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open(path)?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// The contents of the UTF-8 text file `path` beneath this directory.
    pub fn read_to_string(&self, path: impl AsRef<Path>) -> io::Result<String> {
        String::from_utf8(self.read(path)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cinfer-dir-{}-{name}", std::process::id()));
        std::fs::create_dir_all(d.join("inside/sub")).expect("tmp");
        d
    }

    #[test]
    fn files_beneath_are_read_and_nothing_outside_is() {
        let d = tmp("beneath");
        std::fs::write(d.join("secret"), b"outside").expect("write");
        std::fs::write(d.join("inside/sub/f"), b"ok").expect("write");
        std::os::unix::fs::symlink("../secret", d.join("inside/up")).expect("link");
        std::os::unix::fs::symlink(d.join("secret"), d.join("inside/abs")).expect("link");
        std::os::unix::fs::symlink("sub/f", d.join("inside/down")).expect("link");
        let dir = Dir::open_ambient(&d.join("inside")).expect("open");
        assert_eq!(dir.read("sub/f").expect("read"), b"ok");
        assert_eq!(dir.read_to_string("down").expect("link inside"), "ok");
        assert_eq!(dir.read("sub/../sub/f").expect("dotdot inside"), b"ok");
        let secret = d.join("secret");
        for escape in [
            "../secret",
            "sub/../../secret",
            "up",
            "abs",
            secret.to_str().expect("utf-8"),
        ] {
            let err = dir.read(escape).expect_err(escape);
            // EXDEV: the kernel's "would leave the directory".
            assert_eq!(
                err.raw_os_error(),
                Some(Errno::XDEV.raw_os_error()),
                "{escape}: {err}"
            );
        }
        let err = dir.read("sub").expect_err("a directory");
        assert_eq!(err.to_string(), "not a regular file");
        let err = dir.read("missing").expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&d).ok();
    }
}
