//! Config files for every np binary.
//!
//! A config file is TOML whose keys are the long flag names (`listen = "0.0.0.0:7444"`,
//! `manager = ["@alice", "@bob"]`, `verbose = true`); for programs with subcommands a table per
//! subcommand (`[serve]`, `[forward]`). The file's settings are turned into flags placed *before*
//! the user's own, so anything given on the command line wins: single-value flags are overridden
//! (the command is built with `args_override_self`), and a list flag given on the command line
//! replaces the file's list instead of adding to it.
//!
//! The file is `--config PATH` if given, else the binary's default path if it exists.

use clap::Command;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// A key that is no flag of the program.
    #[error("config file {path}, line {line}: unknown setting `{key}` for `{command}` (settings are the long flags of `{command} --help`)")]
    UnknownKey { path: PathBuf, line: usize, key: String, command: String },
    /// A value of a type flags cannot take.
    #[error("config file {path}, line {line}: setting `{key}` must be a string, number, boolean or list of them")]
    BadValue { path: PathBuf, line: usize, key: String },
}

fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key).map(|r| r.trim_start().starts_with('=')).unwrap_or(false)
        })
        .map(|i| i + 1)
        .unwrap_or(0)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// Finds `--config PATH` / `--config=PATH` among the arguments.
fn config_flag(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The command-line arguments with the config file's settings merged in front of the user's.
/// `cmd` is the program's clap command (for the known flags), `default` its default config path.
pub fn merged_args(cmd: &Command, args: Vec<OsString>, default: Option<&Path>) -> Result<Vec<OsString>, ConfigError> {
    let path = match config_flag(&args) {
        Some(p) => p,
        None => match default {
            Some(d) if d.exists() => d.to_path_buf(),
            _ => return Ok(args),
        },
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| ConfigError::Syntax { path: path.clone(), message: e.to_string() })?;
    // Where the subcommand (if any) sits, so its settings go right after it.
    let sub_pos = args.iter().enumerate().skip(1).find_map(|(i, a)| {
        let s = a.to_string_lossy();
        cmd.get_subcommands().find(|c| c.get_name() == s).map(|c| (i, c.clone()))
    });
    let mut out = args.clone();
    let mut insert = |at: usize, c: &Command, tbl: &toml::Table, user: &[OsString]| -> Result<(), ConfigError> {
        let mut extra = Vec::new();
        for (key, v) in tbl {
            // Tables are sections for subcommands, read on their own; anywhere else a table is
            // no flag's value.
            if v.is_table() && c.get_subcommands().any(|s| s.get_name() == key) {
                continue;
            }
            let flag = key.replace('_', "-");
            let known = c.get_arguments().find(|a| a.get_long() == Some(flag.as_str()));
            let Some(arg) = known.filter(|_| !v.is_table()) else {
                if v.is_table() && known.is_some() {
                    return Err(ConfigError::BadValue {
                        path: path.clone(),
                        line: line_of(&text, key),
                        key: key.clone(),
                    });
                }
                return Err(ConfigError::UnknownKey {
                    path: path.clone(),
                    line: line_of(&text, key),
                    key: key.clone(),
                    command: c.get_name().to_string(),
                });
            };
            let long = format!("--{flag}");
            let short = arg.get_short().map(|c| format!("-{c}"));
            let given = user.iter().any(|a| {
                let s = a.to_string_lossy();
                s == long || s.starts_with(&format!("{long}=")) || short.as_deref().is_some_and(|sh| s.starts_with(sh))
            });
            if given {
                continue;
            }
            let bad = || ConfigError::BadValue { path: path.clone(), line: line_of(&text, key), key: key.clone() };
            match v {
                toml::Value::Boolean(true) => extra.push(OsString::from(&long)),
                toml::Value::Boolean(false) => {}
                toml::Value::Array(items) => {
                    for item in items {
                        extra.push(OsString::from(&long));
                        extra.push(OsString::from(scalar(item).ok_or_else(bad)?));
                    }
                }
                other => {
                    extra.push(OsString::from(&long));
                    extra.push(OsString::from(scalar(other).ok_or_else(bad)?));
                }
            }
        }
        out.splice(at..at, extra);
        Ok(())
    };
    match sub_pos {
        Some((i, sub)) => {
            if let Some(toml::Value::Table(t)) = table.get(sub.get_name()) {
                let user = args[i + 1..].to_vec();
                insert(i + 1, &sub, t, &user)?;
            }
            // Top-level keys are the program's global flags.
            insert(1, cmd, &table, &args[1..])?;
        }
        None => {
            let user = args[1..].to_vec();
            insert(1, cmd, &table, &user)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("npd")
            .args_override_self(true)
            .arg(Arg::new("listen").long("listen").default_value("0.0.0.0:1"))
            .arg(Arg::new("manager").long("manager").action(ArgAction::Append))
            .arg(Arg::new("verbose").long("verbose").short('v').action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
    }

    fn run(text: &str, user: &[&str]) -> Result<clap::ArgMatches, String> {
        let t = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = t.path().join("c.toml");
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        let mut args: Vec<OsString> = vec!["npd".into(), "--config".into(), p.clone().into()];
        args.extend(user.iter().map(OsString::from));
        let merged = merged_args(&cmd(), args, None).map_err(|e| e.to_string())?;
        cmd().try_get_matches_from(merged).map_err(|e| e.to_string())
    }

    #[test]
    fn file_then_flags_win() {
        let m = run("listen = \"1.2.3.4:5\"\nmanager = [\"@a\", \"@b\"]\nverbose = true\n", &[]).expect("ok");
        assert_eq!(m.get_one::<String>("listen").map(String::as_str), Some("1.2.3.4:5"));
        assert_eq!(
            m.get_many::<String>("manager").map(|v| v.cloned().collect::<Vec<_>>()),
            Some(vec!["@a".into(), "@b".into()])
        );
        assert!(m.get_flag("verbose"));
        let m =
            run("listen = \"1.2.3.4:5\"\nmanager = [\"@a\", \"@b\"]\n", &["--listen", "9.9.9.9:9", "--manager", "@c"])
                .expect("ok");
        assert_eq!(m.get_one::<String>("listen").map(String::as_str), Some("9.9.9.9:9"));
        assert_eq!(m.get_many::<String>("manager").map(|v| v.cloned().collect::<Vec<_>>()), Some(vec!["@c".into()]));
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = run("listen = \"x\"\n\nlisen = \"y\"\n", &[]).expect_err("unknown");
        assert!(e.contains("line 3") && e.contains("lisen"), "{e}");
        let e = run("listen = \n", &[]).expect_err("syntax");
        assert!(e.contains("line 1"), "{e}");
        let e = run("listen = { a = 1 }\n", &[]).expect_err("table");
        assert!(e.contains("line 1") && e.contains("listen"), "{e}");
        let e = run("listen = \"x\"\nmanager = [[1]]\n", &[]).expect_err("value");
        assert!(e.contains("line 2") && e.contains("manager"), "{e}");
    }
}
