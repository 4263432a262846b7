//! `--print-completion bash|zsh|fish`: completion scripts generated from the
//! flag table (torchrun prints its own through shtab). The table is the
//! argparse-exact parser's; clap only describes it to `clap_complete`.

use clap::{Arg, ArgAction, Command, ValueHint};
use clap_complete::Shell;

use crate::args::{flag_table, UsageError};

/// The shells we print completions for.
pub const SHELLS: &[&str] = &["bash", "zsh", "fish"];

fn command() -> Command {
    let mut cmd = Command::new("torchrun-rs")
        .about("A drop-in replacement for torchrun (torch.distributed.run)")
        .disable_help_flag(true)
        .disable_version_flag(true);
    for f in flag_table() {
        let mut arg = Arg::new(f.dest).help(f.help);
        let mut longs = f.names.iter().filter_map(|n| n.strip_prefix("--"));
        if let Some(long) = longs.next() {
            arg = arg.long(long);
        }
        for alias in longs {
            arg = arg.visible_alias(alias);
        }
        if let Some(short) = f
            .names
            .iter()
            .find(|n| n.len() == 2 && !n.starts_with("--"))
            .and_then(|n| n.chars().nth(1))
        {
            arg = arg.short(short);
        }
        arg = if f.takes_value {
            let arg = arg.action(ArgAction::Set).value_name("VALUE");
            if f.names.contains(&"--log-dir") {
                arg.value_hint(ValueHint::DirPath)
            } else {
                arg
            }
        } else {
            arg.action(ArgAction::SetTrue)
        };
        cmd = cmd.arg(arg);
    }
    cmd.arg(
        Arg::new("training_script")
            .value_hint(ValueHint::FilePath)
            .help("The script (or module, or binary) every worker runs"),
    )
    .arg(
        Arg::new("training_script_args")
            .num_args(0..)
            .trailing_var_arg(true)
            .allow_hyphen_values(true),
    )
}

/// The completion script for `shell`.
pub fn script(shell: &str) -> Result<String, UsageError> {
    let sh = match shell.trim() {
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        other => {
            return Err(UsageError(format!(
                "argument --print-completion: invalid choice: '{other}' (choose from {})",
                SHELLS
                    .iter()
                    .map(|s| format!("'{s}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let mut out = Vec::new();
    clap_complete::generate(sh, &mut command(), "torchrun-rs", &mut out);
    Ok(String::from_utf8_lossy(&out).into_owned())
}
