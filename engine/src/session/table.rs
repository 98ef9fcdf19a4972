//! The session table: every replayed session of one worker, keyed by [`FlowKey`], with a
//! timer heap. One owner, no locks.

use super::{
    ClientSegment, Output, Response, Scratch, Session, SessionConfig, SessionStats, Verdict,
};
use crate::flow::FlowKey;
use crate::wire::TcpFlags;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

/// A timer entry: a deadline and the session it belongs to. Ordered by deadline only.
#[derive(Debug, Clone, Copy)]
struct Timer(Duration, FlowKey);

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

/// All sessions of one worker.
#[derive(Debug)]
pub struct SessionTable {
    config: SessionConfig,
    sessions: HashMap<FlowKey, Session>,
    timers: BinaryHeap<Reverse<Timer>>,
    stats: SessionStats,
    scratch: Scratch,
}

impl SessionTable {
    /// An empty table.
    pub fn new(config: SessionConfig) -> SessionTable {
        SessionTable {
            sessions: HashMap::with_capacity(config.max_sessions.min(1 << 16)),
            config,
            timers: BinaryHeap::new(),
            stats: SessionStats::default(),
            scratch: Scratch::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Sessions in the table (lingering closed ones included).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Sessions not yet over.
    pub fn active(&self) -> usize {
        self.sessions.values().filter(|s| !s.is_closed()).count()
    }

    /// The counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// The session for `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Option<&Session> {
        self.sessions.get(key)
    }

    /// Handles one captured client segment whose packet (`packet`, from the IPv4 header on)
    /// has already been rewritten to the target-facing `key`.
    pub fn on_client_packet(
        &mut self,
        key: FlowKey,
        packet: &[u8],
        seg: &ClientSegment,
        now: Duration,
        out: &mut dyn Output,
    ) {
        let Self {
            config,
            sessions,
            stats,
            scratch,
            ..
        } = self;
        if seg.flags.contains(TcpFlags::SYN) {
            if seg.flags.contains(TcpFlags::ACK) {
                return; // A SYN-ACK from the client side: not a session we replay.
            }
            if let Some(old) = sessions.get_mut(&key) {
                if old.client_isn == seg.seq && !old.is_closed() {
                    stats.client_syn_retransmits += 1;
                    return;
                }
                if old.is_closed() {
                    stats.port_reuse_replaced += 1;
                } else {
                    // The client reused the 4-tuple while we still replay the old session:
                    // end the old one at the target so the new SYN is not taken as its duplicate.
                    old.reset_target(stats, out, scratch);
                    stats.port_reuse_resets += 1;
                }
                sessions.remove(&key);
                stats.removed += 1;
                out.unregister(key);
            }
            if sessions.len() >= config.max_sessions {
                stats.table_full += 1;
                return;
            }
            let mut session = Session::new(key, seg, now, config);
            out.register(key);
            session.queue.push_back(super::Segment {
                seq: seg.seq,
                seq_len: seg.seq_len(),
                flags: seg.flags,
                online_ack: seg.ack,
                packet: packet.to_vec(),
            });
            session.queued_bytes = packet.len();
            session.queued_end = seg.seq.add(1);
            session.send_segment(0, false, out);
            session.sent = 1;
            session.snd_nxt = seg.seq.add(1);
            session.rto_deadline = Some(now + session.rto);
            session.last_send_at = now;
            stats.created += 1;
            stats.sent_syn += 1;
            stats.sent_segments += 1;
            sessions.insert(key, session);
            self.schedule(key);
            return;
        }
        let Some(session) = sessions.get_mut(&key) else {
            stats.client_no_session += 1;
            return;
        };
        let verdict = session.on_client(packet, seg, now, config, stats, out, scratch);
        self.settle(key, verdict, out);
    }

    /// Handles one reply of the target relayed by intercept.
    pub fn on_response(&mut self, resp: &Response, now: Duration, out: &mut dyn Output) {
        let Self {
            config,
            sessions,
            stats,
            scratch,
            ..
        } = self;
        let Some(session) = sessions.get_mut(&resp.key) else {
            stats.response_no_session += 1;
            return;
        };
        let verdict = session.on_response(resp, now, config, stats, out, scratch);
        self.settle(resp.key, verdict, out);
    }

    /// Runs due timers: at most `budget` sessions. Returns how many ran.
    pub fn run_timers(&mut self, now: Duration, budget: usize, out: &mut dyn Output) -> usize {
        let mut ran = 0;
        while ran < budget {
            let Some(Reverse(Timer(deadline, key))) = self.timers.peek().copied() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Self {
                config,
                sessions,
                stats,
                scratch,
                ..
            } = self;
            let Some(session) = sessions.get_mut(&key) else {
                continue;
            };
            if session.scheduled != Some(deadline) {
                continue; // stale entry
            }
            session.scheduled = None;
            ran += 1;
            let verdict = session.on_timer(now, config, stats, out, scratch);
            self.settle(key, verdict, out);
        }
        // Stale entries pile up when deadlines move earlier; rebuild when they dominate.
        if self.timers.len() > 4 * self.sessions.len() + 4096 {
            self.rebuild_timers();
        }
        ran
    }

    /// The earliest pending deadline, for the caller's idle wait.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.timers.peek().map(|Reverse(Timer(d, _))| *d)
    }

    /// Ends every open session at the target (an RST each) and empties the table: what a
    /// clean stop owes the target.
    pub fn shutdown(&mut self, now: Duration, out: &mut dyn Output) {
        let Self {
            config,
            sessions,
            stats,
            scratch,
            ..
        } = self;
        for (key, session) in sessions.iter_mut() {
            if !session.is_closed() {
                session.reset_target(stats, out, scratch);
                session.close(now, config);
            }
            out.unregister(*key);
            stats.removed += 1;
        }
        sessions.clear();
        self.timers.clear();
    }

    fn settle(&mut self, key: FlowKey, verdict: Verdict, out: &mut dyn Output) {
        match verdict {
            Verdict::Remove => {
                self.sessions.remove(&key);
                self.stats.removed += 1;
                out.unregister(key);
            }
            Verdict::Keep => self.schedule(key),
        }
    }

    fn schedule(&mut self, key: FlowKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let deadline = session.deadline(&self.config);
        match session.scheduled {
            Some(current) if current <= deadline => {}
            _ => {
                session.scheduled = Some(deadline);
                self.timers.push(Reverse(Timer(deadline, key)));
            }
        }
    }

    fn rebuild_timers(&mut self) {
        self.timers.clear();
        for (key, session) in self.sessions.iter_mut() {
            let deadline = session.deadline(&self.config);
            session.scheduled = Some(deadline);
            self.timers.push(Reverse(Timer(deadline, *key)));
        }
    }
}
