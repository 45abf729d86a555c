//! The kernel command line, the one place it is edited (GRUB legacy `kernel` lines, GRUB 2
//! defaults and `linux` lines, BLS `options`): `root=`/`resume=` by UUID, the target's
//! serial console, no splash, and pinned `eth0` names where the source used them.
use super::{Ctx, Target};

/// The arguments that keep the kernel's classic NIC names (eth0, eth1, …).
pub const PIN_ETH_ARGS: [&str; 2] = ["net.ifnames=0", "biosdevname=0"];

/// What the command line of the target needs.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub target: Target,
    /// The source names interfaces eth0, eth1, ...: keep those names.
    pub pin_eth_names: bool,
    /// Add the serial console (once per command line that is always used).
    pub console: bool,
}

/// Edits the arguments of one command line; returns it unchanged when nothing applies.
pub fn edit(args: &str, want: Want, path: &str, ctx: &mut Ctx<'_>) -> String {
    let mut words: Vec<String> = args.split_whitespace().map(str::to_string).collect();
    for w in &mut words {
        for key in ["root=", "resume="] {
            let Some(dev) = w.strip_prefix(key) else {
                continue;
            };
            if !super::fstab::is_device_name(dev) {
                continue;
            }
            match ctx.plan.uuid_of(dev) {
                Some(uuid) => {
                    ctx.note(path, format!("{key}{dev} -> {key}UUID={uuid}"));
                    *w = format!("{key}UUID={uuid}");
                }
                None => ctx.note(
                    path,
                    format!("{key}{dev}: no UUID known for this device (--fs); left as is"),
                ),
            }
        }
    }
    let before = words.len();
    words.retain(|w| w != "rhgb" && w != "quiet" && !w.starts_with("splash"));
    if words.len() != before {
        ctx.note(
            path,
            "dropped rhgb/quiet/splash: the boot log goes to the console",
        );
    }
    if want.console && !words.iter().any(|w| w.starts_with("console=ttyS")) {
        words.push("console=tty0".into());
        words.push(format!("console={}", want.target.console()));
        ctx.note(
            path,
            format!("added the serial console {}", want.target.console()),
        );
    }
    if want.console {
        for arg in want.target.kernel_args() {
            if !words.iter().any(|w| w == arg) {
                words.push(arg.to_string());
                ctx.note(path, format!("added {arg}: needed on {}", want.target));
            }
        }
    }
    if want.pin_eth_names {
        for pin in PIN_ETH_ARGS {
            let key = pin.split('=').next().unwrap_or(pin);
            if !words.iter().any(|w| w.split('=').next() == Some(key)) {
                words.push(pin.into());
            }
        }
    }
    let out = words.join(" ");
    // Keep the original spacing when the words did not change.
    if args.split_whitespace().eq(out.split_whitespace()) {
        args.to_string()
    } else {
        out
    }
}
