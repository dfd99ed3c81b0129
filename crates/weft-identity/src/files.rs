//! Files of the data directory: private directory (0700), secret files (0600) written
//! atomically (temporary file, then rename) so a crash never leaves half a key.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use crate::IdentityError;

/// Creates `dir` (and parents) if needed and restricts it to its owner (0700).
pub(crate) fn private_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(|e| IdentityError::io("cannot create data directory", dir, e))?;
    set_mode(dir, 0o700).map_err(|e| IdentityError::io("cannot restrict data directory", dir, e))
}

/// Writes `bytes` to `path` atomically with `mode` (0600 for keys, 0644 for certificates).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32, what: &'static str) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(|e| IdentityError::io(what, &tmp, e))?;
    // The mode given to open() is filtered by the umask; set it exactly.
    set_mode(&tmp, mode).map_err(|e| IdentityError::io(what, &tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| IdentityError::io(what, &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| IdentityError::io(what, path, e))
}

/// Reads a text file; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path, what: &'static str) -> Result<Option<String>, IdentityError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IdentityError::io(what, path, e)),
    }
}

/// Reads a secret file, tightening its mode to 0600 (with a warning) when others could
/// read it.
pub(crate) fn read_secret(path: &Path, what: &'static str) -> Result<String, IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = fs::metadata(path).map_err(|e| IdentityError::io(what, path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "private key readable by others: restricting it to 0600");
            set_mode(path, 0o600).map_err(|e| IdentityError::io(what, path, e))?;
        }
    }
    fs::read_to_string(path).map_err(|e| IdentityError::io(what, path, e))
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}
