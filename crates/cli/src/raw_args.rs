//! The bytes of the arguments that are passed on.
//!
//! The flag parser works on text (torchrun's flags are ASCII), so the
//! command line reaches it through a lossy conversion. What the launcher
//! passes on must not go through that: torchrun hands a script argument,
//! or a `--log-dir`, to the worker and the file system byte for byte, even
//! when it is not UTF-8. These functions find the original bytes again.

use std::ffi::OsString;
use std::path::PathBuf;

/// The workers' arguments with their original bytes: the script's
/// arguments are the tail of the command line, so each argument that
/// matches the tail (as text) is replaced by the raw argument it came from.
/// Arguments the launcher made up itself (`-u`, say) stay as they are.
///
/// Also returns how many arguments at the end of `argv` are the script and
/// its arguments: what comes before is the launcher's own flags.
pub fn worker_args(args: &[String], argv: &[OsString]) -> (Vec<OsString>, usize) {
    let mut out: Vec<OsString> = args.iter().map(OsString::from).collect();
    let mut tail = 0;
    for (slot, raw) in out.iter_mut().rev().zip(argv.iter().rev()) {
        if raw.to_string_lossy() != slot.to_string_lossy() {
            break;
        }
        *slot = raw.clone();
        tail += 1;
    }
    (out, tail)
}

/// The raw bytes of a path flag's value (`--log-dir`), when its text was
/// changed by the lossy conversion: from `--flag=VALUE` or the argument
/// after the flag among `flags` (the launcher's own arguments, never the
/// script's), else from the `PET_*` variable.
pub fn path_value(text: PathBuf, flags: &[OsString], pet: &str) -> PathBuf {
    let argv = flags;
    let lossy = text.to_string_lossy().into_owned();
    if !lossy.contains('\u{FFFD}') {
        return text;
    }
    use std::os::unix::ffi::OsStrExt;
    for (i, a) in argv.iter().enumerate() {
        let bytes = a.as_bytes();
        if let Some(eq) = bytes.iter().position(|&b| b == b'=') {
            let value = std::ffi::OsStr::from_bytes(&bytes[eq + 1..]);
            if bytes.starts_with(b"--") && value.to_string_lossy() == lossy {
                return PathBuf::from(value);
            }
        }
        if a.to_string_lossy() == lossy && i > 0 && argv[i - 1].as_bytes().starts_with(b"--") {
            return PathBuf::from(a);
        }
    }
    match std::env::var_os(pet) {
        Some(v) if v.to_string_lossy() == lossy => PathBuf::from(v),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn the_scripts_arguments_keep_their_bytes() {
        let bad = OsString::from_vec(b"caf\xe9".to_vec());
        let argv = vec![
            OsString::from("--nproc-per-node=2"),
            OsString::from("t.py"),
            bad.clone(),
        ];
        let text: Vec<String> = vec!["-u".into(), "t.py".into(), "caf\u{FFFD}".into()];
        let (got, tail) = worker_args(&text, &argv);
        assert_eq!(got, vec![OsString::from("-u"), OsString::from("t.py"), bad]);
        assert_eq!(tail, 2, "the script and its argument");
    }

    #[test]
    fn a_log_dir_keeps_its_bytes() {
        let bad = OsString::from_vec(b"/tmp/l\xff".to_vec());
        let mut eq = OsString::from("--log-dir=");
        eq.push(&bad);
        for argv in [
            vec![eq, OsString::from("t.py")],
            vec![OsString::from("--log-dir"), bad.clone(), "t.py".into()],
        ] {
            let text = PathBuf::from(bad.to_string_lossy().into_owned());
            assert_eq!(
                path_value(text, &argv, "PET_LOG_DIR_UNSET"),
                PathBuf::from(&bad)
            );
        }
        let plain = PathBuf::from("/tmp/x");
        assert_eq!(path_value(plain.clone(), &[], "X"), plain);
    }
}
