// Modified for Ferry (vendor/README.md): a backlog per channel, so the session loop hands
// messages to a channel's reader without waiting for it; a channel may have a window
// target of its own.
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
    /// Backlogged messages that are not data, which no window bounds.
    backlog_other: usize,
    /// Bytes of data in the backlog: the window offered is the target less these.
    backlog_bytes: usize,
    /// This channel's own receive-window target, once the handler set one
    /// (`channel_window`); the session's target until then.
    window: Option<u32>,
}

/// Backlogged data packets smaller than this are merged with the data before them, up
/// to `MERGE_UP_TO`, so a peer's tiny packets cost an entry per 16 KiB, not one each;
/// full-size packets are queued as they are, without a copy.
const MERGE_BELOW: usize = 1024;
const MERGE_UP_TO: usize = 16 * 1024;
/// Backlogged requests and replies kept at most; past this a peer is flooding a channel
/// whose reader has stopped, and they are dropped (EOF, close and exit status never are).
const MAX_BACKLOG_OTHER: usize = 1024;
/// Backlogged data entries kept at most: one window in full-size packets takes a few
/// hundred; only a peer alternating tiny packets of different kinds gets near this.
const MAX_BACKLOG_DATA_ENTRIES: usize = 65_536;

/// Appends a small data packet to the backlogged entry before it, if that is data of
/// the same kind with room; false if it is to be queued on its own.
fn merge(last: &mut ChannelMsg, msg: &ChannelMsg) -> bool {
    let (last, data) = match (last, msg) {
        (ChannelMsg::Data { data: last }, ChannelMsg::Data { data }) => (last, data),
        (
            ChannelMsg::ExtendedData { data: last, ext: a },
            ChannelMsg::ExtendedData { data, ext: b },
        ) if a == b => (last, data),
        _ => return false,
    };
    if data.len() >= MERGE_BELOW || last.len() + data.len() > MERGE_UP_TO {
        return false;
    }
    let mut merged = bytes::BytesMut::with_capacity(last.len() + data.len());
    merged.extend_from_slice(last);
    merged.extend_from_slice(data);
    *last = merged.freeze();
    true
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
            backlog: VecDeque::new(),
            window_withheld: false,
            backlog_other: 0,
            backlog_bytes: 0,
            window: None,
        }
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }

    /// Hands `msg` to the channel's reader without waiting: when its queue is full the
    /// message waits here, behind any that already wait, so order is kept.
    pub(crate) fn deliver(&mut self, msg: ChannelMsg) {
        let msg = if self.backlog.is_empty() {
            match self.sender.try_send(msg) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(msg)) => msg,
            }
        } else {
            msg
        };
        self.push_backlog(msg);
    }

    fn push_backlog(&mut self, msg: ChannelMsg) {
        let len = data_len(&msg);
        match msg {
            ChannelMsg::Data { .. } | ChannelMsg::ExtendedData { .. } => {
                if len == 0 {
                    return; // nothing to deliver, and it would cost an entry
                }
                if let Some(last) = self.backlog.back_mut()
                    && merge(last, &msg)
                {
                    self.backlog_bytes += len;
                    return;
                }
                if self.backlog.len() - self.backlog_other >= MAX_BACKLOG_DATA_ENTRIES {
                    log::warn!("channel reader lags and the peer floods it: dropped {len} bytes");
                    return;
                }
                self.backlog_bytes += len;
                self.backlog.push_back(msg);
            }
            // At most one of each per channel, and the reader must see them.
            ChannelMsg::Eof
            | ChannelMsg::Close
            | ChannelMsg::ExitStatus { .. }
            | ChannelMsg::ExitSignal { .. } => {
                self.backlog_other += 1;
                self.backlog.push_back(msg);
            }
            msg if self.backlog_other < MAX_BACKLOG_OTHER => {
                self.backlog_other += 1;
                self.backlog.push_back(msg);
            }
            msg => log::warn!("channel reader lags and the peer floods it: dropped {msg:?}"),
        }
    }

    /// Moves what the reader's queue has room for; true when nothing waits any more.
    /// A reader that has gone away takes nothing: its backlog is dropped.
    pub(crate) fn drain(&mut self) -> bool {
        while let Some(msg) = self.backlog.pop_front() {
            let len = data_len(&msg);
            let other = !matches!(
                msg,
                ChannelMsg::Data { .. } | ChannelMsg::ExtendedData { .. }
            );
            match self.sender.try_send(msg) {
                Ok(()) => {
                    self.backlog_other -= usize::from(other);
                    self.backlog_bytes -= len;
                }
                Err(TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    self.backlog_other = 0;
                    self.backlog_bytes = 0;
                }
                Err(TrySendError::Full(msg)) => {
                    self.backlog.push_front(msg);
                    return false;
                }
            }
        }
        true
    }

    /// The receive window to offer: `target` less what waits for the reader, so the
    /// peer may keep sending while the reader catches up and stops once a whole window
    /// waits here.
    fn window_target(&self, target: u32) -> u32 {
        self.window_or(target)
            .saturating_sub(u32::try_from(self.backlog_bytes).unwrap_or(u32::MAX))
    }

    /// This channel's receive-window target: its own, or the session's `target`.
    pub(crate) fn window_or(&self, target: u32) -> u32 {
        self.window.unwrap_or(target)
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

/// How often a session loop looks again at a window it held back during a key exchange
/// (a reader taking a message wakes the loop through `backlog_room` otherwise).
pub(crate) const BACKLOG_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Hands received channel data to its reader. The window is debited now and offered
/// back less what waits in the backlog (`window_target`). A peer that overruns the
/// window of a channel that already has a backlog loses that data (RFC 4254 5.2 lets a
/// receiver ignore it), so memory per channel stays bounded by the window. `window`,
/// when the handler gave one, becomes this channel's own target from now on.
pub(crate) fn receive_data(
    channels: &mut std::collections::HashMap<crate::ChannelId, ChannelRef>,
    enc: Option<&mut crate::session::Encrypted>,
    id: crate::ChannelId,
    msg: ChannelMsg,
    len: usize,
    target: u32,
    window: Option<u32>,
) -> Result<bool, crate::Error> {
    let mut enc = enc;
    let within = match enc.as_deref_mut() {
        Some(enc) => enc.debit_window(id, len),
        None => true,
    };
    let Some(chan) = channels.get_mut(&id) else {
        return Ok(false);
    };
    // Taken even when the data is dropped below: the handler counts on it from now on.
    if window.is_some() {
        chan.window = window;
    }
    if chan.is_backlogged() && !within {
        log::warn!("channel {id:?}: peer sent past the window while its reader lags, dropped");
        return Ok(false);
    }
    chan.deliver(msg);
    chan.window_withheld = chan.is_backlogged();
    match enc {
        Some(enc) => enc.replenish_window(id, chan.window_target(target)),
        None => Ok(false),
    }
}

/// Resolves as soon as the reader of some backlogged channel has taken a message (or
/// gone away), so the loop refills that reader's queue at once instead of on its next
/// packet or poll.
pub(crate) fn backlog_room(
    channels: &std::collections::HashMap<crate::ChannelId, ChannelRef>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let waits: Vec<_> = channels
        .values()
        .filter(|c| c.is_backlogged())
        .map(|c| Box::pin(c.sender.clone().reserve_owned()))
        .collect();
    async move {
        if waits.is_empty() {
            return std::future::pending().await;
        }
        // The permit is dropped at once: the slot goes back to the queue for the drain.
        let _ = futures::future::select_all(waits).await;
    }
}

/// Whether a channel's window is held back with nothing left to drain (the backlog
/// emptied during a key exchange): only a poll reopens it.
pub(crate) fn any_window_withheld(
    channels: &std::collections::HashMap<crate::ChannelId, ChannelRef>,
) -> bool {
    channels
        .values()
        .any(|c| c.window_withheld && !c.is_backlogged())
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
        if !chan.needs_drain() {
            continue;
        }
        let caught_up = chan.drain();
        if kex_active {
            continue;
        }
        chan.window_withheld = !caught_up;
        if let Some(enc) = enc.as_deref_mut() {
            enc.replenish_window(*id, chan.window_target(target))?;
        }
    }
    Ok(())
}

/// Ends a channel the peer closed: `Close` follows whatever still waits.
pub(crate) fn deliver_close(chan: Option<ChannelRef>) {
    if let Some(mut chan) = chan {
        chan.deliver(ChannelMsg::Close);
    }
}

impl Drop for ChannelRef {
    /// A channel leaves the session (closed, or the session ended) with messages still
    /// waiting: a task of its own hands them to the reader, so the tail is not lost and
    /// the session loop does not wait for a slow reader.
    fn drop(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backlog = std::mem::take(&mut self.backlog);
        let sender = self.sender.clone();
        runtime.spawn(async move {
            for msg in backlog {
                if sender.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn data_len(msg: &ChannelMsg) -> usize {
    match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len(),
        _ => 0,
    }
}
