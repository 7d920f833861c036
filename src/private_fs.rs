//! Secrets at rest: what mxpay writes is private to its user, and the secrets it reads must be.
//!
//! `data_dir` holds the ledger, PIN hashes, the bot's device keys and raw transactions (which
//! may hold a PIN typed in the wrong room): the process umask is 077 so every file and
//! directory mxpay creates is owner-only (0600 / 0700), and `data_dir` itself is kept 0700.
//! A secret mxpay reads (the PIN pepper, the admin token key, webhook secrets) is refused when
//! its file lets group or others in, as ssh refuses such a private key: such a file has
//! probably been read by someone else already, and starting would hide that.

use std::path::{Path, PathBuf};

/// Permission bits a secret file and `data_dir` must not have: any access by group or others.
pub const GROUP_OTHER_BITS: u32 = 0o077;

/// Why a file or directory is not private.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFsError {
    /// A secret file lets group or others in.
    #[error(
        "{path} is open to group or others (mode {mode:04o}); a secret file must be private to \
         mxpay's user: run `chmod 600 {path}`",
        path = path.display()
    )]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's permissions could not be read.
    #[error("cannot read the permissions of {path}: {source}", path = path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `data_dir` could not be created or made owner-only.
    #[error(
        "cannot create data_dir {path} or make it private (mode 0700): {source}",
        path = path.display()
    )]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Sets the process umask to 077, so every file and directory mxpay (and anything it starts)
/// creates from now on is owner-only. Call once, first thing in the process.
pub fn restrict_umask() {
    #[cfg(unix)]
    // SAFETY: umask(2) only swaps the process's file-creation mask; it cannot fail and touches
    // no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and its parents) if missing and makes it 0700, also when it existed with
/// wider permissions (created by hand, or by an older mxpay).
pub fn make_private_dir(dir: &Path) -> Result<(), PrivateFsError> {
    let failed = |source| PrivateFsError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir).map_err(failed)?.permissions().mode();
        if mode & GROUP_OTHER_BITS != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(failed)?;
        }
    }
    Ok(())
}

/// Refuses `file` (opened from `path`, a secret about to be read) when group or others have
/// any access to it. Checks the open file, not the path, so a swapped path cannot slip by.
pub fn check_private_file(file: &std::fs::File, path: &Path) -> Result<(), PrivateFsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file
            .metadata()
            .map_err(|source| PrivateFsError::Metadata {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode()
            & 0o7777;
        if mode & GROUP_OTHER_BITS != 0 {
            return Err(PrivateFsError::NotPrivate {
                path: path.to_owned(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_secret_file_open_to_others_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pepper");
        std::fs::write(&path, "secret-value").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let result = check_private_file(&file, &path);
            assert_eq!(result.is_ok(), ok, "mode {mode:o}");
            if let Err(error) = result {
                let message = error.to_string();
                let fix = format!("chmod 600 {}", path.display());
                assert!(message.contains(&fix), "{message}");
                assert!(message.contains(&format!("{mode:04o}")), "{message}");
                assert!(!message.contains("secret-value"), "{message}");
            }
        }
    }

    #[test]
    fn data_dir_is_created_or_narrowed_to_0700() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        make_private_dir(&fresh).unwrap();
        assert_eq!(mode_of(&fresh), 0o700);
        let wide = dir.path().join("wide");
        std::fs::create_dir(&wide).unwrap();
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o755)).unwrap();
        make_private_dir(&wide).unwrap();
        assert_eq!(mode_of(&wide), 0o700);
    }
}
