// Modified for Ferry (vendor/README.md): a backlog per channel, so the session loop hands
// messages to a channel's reader without waiting for it.
use std::collections::VecDeque;

use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;

use super::WindowSizeRef;
use crate::ChannelMsg;

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
#[derive(Debug)]
pub struct ChannelRef {
    pub(super) sender: Sender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
    /// Messages the reader's queue had no room for, oldest first. While any are here
    /// the channel's receive window is not replenished, so a peer that respects the
    /// window stops sending on this channel and only this channel.
    backlog: VecDeque<ChannelMsg>,
    /// A window adjustment was held back while the backlog was not empty.
    pub(crate) window_withheld: bool,
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
            backlog: VecDeque::new(),
            window_withheld: false,
        }
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }

    /// Hands `msg` to the channel's reader without waiting: when its queue is full the
    /// message waits here, behind any that already wait, so order is kept.
    pub(crate) fn deliver(&mut self, msg: ChannelMsg) {
        if self.backlog.is_empty() {
            match self.sender.try_send(msg) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(msg)) => self.backlog.push_back(msg),
            }
        } else {
            self.backlog.push_back(msg);
        }
    }

    /// Moves what the reader's queue has room for; true when nothing waits any more.
    /// A reader that has gone away takes nothing: its backlog is dropped.
    pub(crate) fn drain(&mut self) -> bool {
        while let Some(msg) = self.backlog.pop_front() {
            match self.sender.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => self.backlog.clear(),
                Err(TrySendError::Full(msg)) => {
                    self.backlog.push_front(msg);
                    return false;
                }
            }
        }
        true
    }

    /// Whether messages wait for room in the reader's queue.
    pub(crate) fn is_backlogged(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Whether the loop has work for this channel once its reader makes room.
    pub(crate) fn needs_drain(&self) -> bool {
        self.is_backlogged() || self.window_withheld
    }
}

impl std::ops::Deref for ChannelRef {
    type Target = Sender<ChannelMsg>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}

/// How often a session loop looks at backlogged channels, only while there are any.
pub(crate) const BACKLOG_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Hands received channel data to its reader. The window is debited now; it is opened
/// again only if the reader took the data at once. A peer that overruns the window of a
/// channel that already has a backlog loses that data (RFC 4254 5.2 lets a receiver
/// ignore it), so memory per channel stays bounded by the window.
pub(crate) fn receive_data(
    channels: &mut std::collections::HashMap<crate::ChannelId, ChannelRef>,
    enc: Option<&mut crate::session::Encrypted>,
    id: crate::ChannelId,
    msg: ChannelMsg,
    len: usize,
    target: u32,
) -> Result<bool, crate::Error> {
    let mut enc = enc;
    let within = match enc.as_deref_mut() {
        Some(enc) => enc.debit_window(id, len),
        None => true,
    };
    let Some(chan) = channels.get_mut(&id) else {
        return Ok(false);
    };
    if chan.is_backlogged() && !within {
        log::warn!("channel {id:?}: peer sent past the window while its reader lags, dropped");
        return Ok(false);
    }
    chan.deliver(msg);
    if chan.is_backlogged() {
        chan.window_withheld = true;
        return Ok(false);
    }
    match enc {
        Some(enc) => enc.replenish_window(id, target),
        None => Ok(false),
    }
}

/// Whether any channel waits for its reader.
pub(crate) fn any_backlog(
    channels: &std::collections::HashMap<crate::ChannelId, ChannelRef>,
) -> bool {
    channels.values().any(ChannelRef::needs_drain)
}

/// Moves what readers have made room for, and opens again the window of each channel
/// whose reader has caught up (not during a key exchange: that waits for the next turn).
pub(crate) fn drain_backlogs(
    channels: &mut std::collections::HashMap<crate::ChannelId, ChannelRef>,
    mut enc: Option<&mut crate::session::Encrypted>,
    target: u32,
    kex_active: bool,
) -> Result<(), crate::Error> {
    for (id, chan) in channels.iter_mut() {
        if !chan.needs_drain() || !chan.drain() || kex_active {
            continue;
        }
        chan.window_withheld = false;
        if let Some(enc) = enc.as_deref_mut() {
            enc.replenish_window(*id, target)?;
        }
    }
    Ok(())
}

/// Ends a channel the peer closed: `Close` follows whatever still waits, handed over by
/// a task of its own so the session loop does not wait for a slow reader.
pub(crate) fn deliver_close(chan: Option<ChannelRef>) {
    let Some(mut chan) = chan else {
        return;
    };
    chan.deliver(ChannelMsg::Close);
    if !chan.is_backlogged() {
        return;
    }
    let backlog = std::mem::take(&mut chan.backlog);
    let sender = chan.sender.clone();
    russh_util::runtime::spawn(async move {
        for msg in backlog {
            if sender.send(msg).await.is_err() {
                break;
            }
        }
    });
}
