//! `np ssh-config` and `np ssh`: the system's OpenSSH, with `np nc` as its ProxyCommand.

use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::Path;

/// The np flags a ProxyCommand passes on to `np nc`, so it acts as the `np ssh` that wrote it.
#[derive(Clone, Debug, Default)]
pub struct NcFlags {
    pub home: Option<std::path::PathBuf>,
    pub me: Option<np_identity::Name>,
    pub relay: Option<np_identity::Name>,
}

/// Quotes `s` for the shell ssh runs a ProxyCommand with (`sh -c`); ssh's own `%` tokens are
/// left for ssh to expand, with a literal `%` doubled.
pub fn sh_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:@=,".contains(c);
    let s = s.replace('%', "%%");
    if !s.is_empty() && s.chars().all(safe) {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The ProxyCommand: this very np binary (by absolute path, so ssh finds it whatever its PATH),
/// `nc %h %p`, and the flags.
pub fn proxy_command(np: &Path, flags: &NcFlags) -> String {
    let mut cmd = vec![sh_quote(&np.to_string_lossy())];
    if let Some(h) = &flags.home {
        let abs = std::path::absolute(h).unwrap_or_else(|_| h.clone());
        cmd.extend(["--home".to_string(), sh_quote(&abs.to_string_lossy())]);
    }
    // `--as` and `--relay` are nc's own options: after the subcommand, not before it.
    cmd.push("nc".into());
    if let Some(me) = &flags.me {
        cmd.extend(["--as".to_string(), sh_quote(&me.to_string())]);
    }
    if let Some(r) = &flags.relay {
        cmd.extend(["--relay".to_string(), sh_quote(&r.to_string())]);
    }
    cmd.extend(["%h".into(), "%p".into()]);
    cmd.join(" ")
}

/// The `Host *.np` block `np ssh-config` prints. Nothing in it touches host-key checking: each
/// device's key is learnt and checked under its name (`pi4.alice_device.np`, which ssh passes
/// to np nc as `%h` and keys known_hosts by), like any host's.
///
/// `HostKeyAlias %h` is left out on purpose: OpenSSH does not expand tokens in HostKeyAlias
/// (ssh_config(5), 9.x), so it would file every device's key under the literal name `%h` and
/// make one device's key stand for all. `np ssh` sets the alias itself, spelt out.
pub fn config_block(np: &Path, flags: &NcFlags) -> String {
    format!(
        "# np: ssh to devices by name (ssh pi@pi4.alice_device.np), through np nc. From `np ssh-config`.\n\
         Host *.np\n    ProxyCommand {}\n",
        proxy_command(np, flags)
    )
}

/// `np ssh [USER@]DEVICE`'s destination, split: the user if one was given, and the device. A
/// device written `NAME@ID` has one `@`; `USER@NAME@ID`, `USER@NAME.ID.np` and
/// `USER@ADDRESS` name a user too.
pub fn split_destination(s: &str) -> Result<(Option<String>, crate::nc::DeviceArg), String> {
    if let Ok(d) = s.parse::<crate::nc::DeviceArg>() {
        return Ok((None, d));
    }
    let (user, device) = s.split_once('@').ok_or_else(|| format!("{s:?} is not [USER@]DEVICE"))?;
    if user.is_empty() {
        return Err(format!("{s:?}: empty user name"));
    }
    Ok((Some(user.to_string()), device.parse()?))
}

/// The host name ssh is given (and files the device's key under): `NAME.ID.np`, or the address.
pub fn ssh_host(device: &crate::nc::DeviceArg) -> String {
    match device {
        crate::nc::DeviceArg::Ref(d) => crate::up::dns_name(d),
        crate::nc::DeviceArg::Address(a) => a.to_string(),
    }
}

/// The arguments `np ssh` runs ssh with: the ProxyCommand and HostKeyAlias first, then the
/// destination, then everything the user gave (options, `--`, a command), unchanged.
pub fn ssh_args(np: &Path, flags: &NcFlags, destination: &str, rest: &[OsString]) -> Result<Vec<OsString>, String> {
    let (user, device) = split_destination(destination)?;
    let host = ssh_host(&device);
    let mut args: Vec<OsString> = vec![
        "-o".into(),
        format!("ProxyCommand={}", proxy_command(np, flags)).into(),
        "-o".into(),
        format!("HostKeyAlias={host}").into(),
    ];
    args.push(match user {
        Some(u) => format!("{u}@{host}").into(),
        None => host.into(),
    });
    args.extend(rest.iter().cloned());
    Ok(args)
}

/// Replaces this process with `ssh` (so ssh has the terminal, the signals and the exit code).
pub fn exec_ssh(ssh: &OsString, args: Vec<OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(ssh).args(args).exec();
    Err(err).with_context(|| format!("running {}", ssh.to_string_lossy()))
}

/// The absolute path of this np binary.
pub fn this_np() -> Result<std::path::PathBuf> {
    std::env::current_exe().context("finding the path of the np binary")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nc::DeviceArg;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/usr/bin/np"), "/usr/bin/np");
        assert_eq!(sh_quote("/home/a b/np"), "'/home/a b/np'");
        assert_eq!(sh_quote("/x/it's"), r"'/x/it'\''s'");
        assert_eq!(sh_quote("/x/100%"), "'/x/100%%'");
        assert_eq!(sh_quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn the_config_block() {
        let b = config_block(Path::new("/opt/np/bin/np"), &NcFlags::default());
        assert!(b.contains("Host *.np\n"), "{b}");
        assert!(b.contains("    ProxyCommand /opt/np/bin/np nc %h %p\n"), "{b}");
        let lower = b.to_ascii_lowercase();
        for weak in ["stricthostkeychecking", "userknownhostsfile", "hostkeyalias", "checkhostip"] {
            assert!(!lower.lines().any(|l| !l.starts_with('#') && l.contains(weak)), "{weak} in {b}");
        }
        let flags = NcFlags {
            home: Some("/h/.np".into()),
            me: Some("@alice".parse().expect("name")),
            relay: Some("@relay".parse().expect("name")),
        };
        assert_eq!(proxy_command(Path::new("/np"), &flags), "/np --home /h/.np nc --as @alice --relay @relay %h %p");
    }

    #[test]
    fn destinations() {
        let pi4 = DeviceArg::Ref("pi4@alice_device".parse().expect("ref"));
        assert_eq!(split_destination("pi4@alice_device"), Ok((None, pi4.clone())));
        assert_eq!(split_destination("pi@pi4@alice_device"), Ok((Some("pi".into()), pi4.clone())));
        assert_eq!(split_destination("pi@pi4.alice_device.np"), Ok((Some("pi".into()), pi4.clone())));
        assert_eq!(split_destination("pi4.alice_device.np"), Ok((None, pi4)));
        assert!(split_destination("@pi4.alice_device.np").is_err());
        assert!(split_destination("example.com").is_err());
        let args = ssh_args(
            Path::new("/np"),
            &NcFlags::default(),
            "root@pi4@alice_device",
            &["-L".into(), "8080:localhost:80".into(), "--".into(), "uname".into(), "-a".into()],
        )
        .expect("args");
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "-o",
                "ProxyCommand=/np nc %h %p",
                "-o",
                "HostKeyAlias=pi4.alice_device.np",
                "root@pi4.alice_device.np",
                "-L",
                "8080:localhost:80",
                "--",
                "uname",
                "-a"
            ]
        );
    }
}
