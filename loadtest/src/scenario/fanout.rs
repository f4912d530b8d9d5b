//! `fanout`: G groups of M members spread over the URLs; a few members of each group send to it
//! at a target total rate; every member counts deliveries (latency, loss, duplicates).

use std::collections::BTreeMap;

use shared::Destination;

use super::{
    Outcome,
    messaging::{self, MessagingFigures},
    support::{WorkerCtx, slice},
};
use crate::{
    cli::FanoutArgs,
    report::{Stats, Summary, figures, round},
};

pub fn validate(a: &FanoutArgs) -> anyhow::Result<Vec<String>> {
    if a.senders_per_group > a.members {
        anyhow::bail!("--senders-per-group must not exceed --members");
    }
    if a.groups * a.members > 2_000_000 {
        anyhow::bail!("groups × members is over 2,000,000 connections");
    }
    let mut warnings = Vec::new();
    let per_sender = a.messaging.rate as f64 / (a.groups * a.senders_per_group) as f64;
    if per_sender > 200.0 {
        warnings.push(format!(
            "each sender sends {per_sender:.0} msg/s, above the gateway's default per-connection \
             limit of 200 frames/s: raise --senders-per-group"
        ));
    }
    Ok(warnings)
}

/// Group `g` of the run.
pub fn group_id(prefix: &str, g: u64) -> String {
    format!("{prefix}-grp{g}")
}

pub async fn worker(args: &FanoutArgs, ctx: WorkerCtx) -> anyhow::Result<Stats> {
    let total = args.groups * args.members;
    let range = slice(total, ctx.worker, ctx.workers, 1);
    let n = (range.end - range.start) as usize;
    let rate = messaging::connect_rate(&args.messaging, n as u64, total);
    let prefix = ctx.shared.prefix.clone();
    let senders = args.groups * args.senders_per_group;
    let expect_messages = messaging::expected_per_member(&args.messaging, args.groups);
    messaging::worker(&args.messaging, ctx, n, rate, move |k| {
        let i = range.start + k as u64;
        let (g, m) = (i / args.members, i % args.members);
        let group = group_id(&prefix, g);
        let send = (m < args.senders_per_group).then(|| {
            messaging::sending(
                Destination::Group {
                    group: group.clone(),
                },
                args.messaging.rate,
                senders,
                g * args.senders_per_group + m,
            )
        });
        messaging::Member {
            index: i as usize,
            local: k,
            user: format!("{prefix}-g{g}-m{m}"),
            join: Some(group.clone()),
            expect_to: Destination::Group { group },
            send,
            slot: g as usize,
            partner_local: None,
            expect_messages,
        }
    })
    .await
}

figures! {
    /// What `fanout` measured: its groups, and what both messaging scenarios measure.
    pub struct FanoutFigures {
        "groups" {
            groups: u64,
            members_per_group: u64,
            senders_per_group: u64,
            /// Groups the coordinator opened before any member joined (one
            /// `PUT /v1/groups/{group}` round trip each), and how long that took.
            groups_opened: u64,
            groups_open_secs: f64,
            /// Members that joined their group.
            joined: u64,
            join_failure_kinds: BTreeMap<String, u64>,
        }
        ..messaging: MessagingFigures
    }
}

pub fn summarize(args: &FanoutArgs, o: &Outcome<'_>) -> Summary {
    let s = o.stats;
    let joined = s.vector("joined");
    let acked = s.vector("acked");
    // Each accepted message should reach every joined member but its sender.
    let expected: u64 = acked
        .iter()
        .enumerate()
        .map(|(g, a)| a * joined.get(g).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    let figures = FanoutFigures {
        groups: args.groups,
        members_per_group: args.members,
        senders_per_group: args.senders_per_group,
        groups_opened: o.opened.groups,
        groups_open_secs: round(o.opened.secs, 3),
        joined: joined.iter().sum(),
        join_failure_kinds: s.with_prefix("join_failed."),
        messaging: messaging::common_figures(
            &args.messaging,
            args.groups * args.members,
            expected,
            s,
        ),
    };
    messaging::summary("group", &figures, &figures.messaging)
}
