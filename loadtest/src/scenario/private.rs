//! `private`: users in pairs send each other private messages at a target total rate (the two
//! users of a pair on different URLs when several are given); counts deliveries, loss, duplicates.

use shared::Destination;

use super::{
    Outcome, messaging,
    support::{WorkerCtx, slice},
};
use crate::{
    cli::PrivateArgs,
    report::{Stats, Summary},
};

/// Users of the run: `--users` rounded up to even.
pub fn users(a: &PrivateArgs) -> u64 {
    a.users.div_ceil(2) * 2
}

pub fn validate(a: &PrivateArgs) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let per_user = a.messaging.rate as f64 / users(a) as f64;
    if per_user > 200.0 {
        warnings.push(format!(
            "each user sends {per_user:.0} msg/s, above the gateway's default per-connection \
             limit of 200 frames/s: raise --users"
        ));
    }
    Ok(warnings)
}

pub async fn worker(args: &PrivateArgs, ctx: WorkerCtx) -> anyhow::Result<Stats> {
    let total = users(args);
    // Pairs stay in one worker, so each sender knows whether its recipient is connected.
    let range = slice(total, ctx.worker, ctx.workers, 2);
    let n = (range.end - range.start) as usize;
    let rate = messaging::connect_rate(&args.messaging, n as u64, total);
    let prefix = ctx.shared.prefix.clone();
    let send_rate = args.messaging.rate;
    let expect_messages = messaging::expected_per_member(&args.messaging, total);
    messaging::worker(&args.messaging, ctx, n, rate, move |k| {
        let i = range.start + k as u64;
        let partner = i ^ 1;
        let user = format!("{prefix}-p{i}");
        messaging::Member {
            index: i as usize,
            local: k,
            user: user.clone(),
            join: None,
            expect_to: Destination::User { user },
            send: Some(messaging::sending(
                Destination::User {
                    user: format!("{prefix}-p{partner}"),
                },
                send_rate,
                total,
                i,
            )),
            slot: 0,
            partner_local: Some((partner - range.start) as usize),
            expect_messages,
        }
    })
    .await
}

pub fn summarize(args: &PrivateArgs, o: &Outcome<'_>) -> Summary {
    let expected = o.stats.get("expected");
    let figures = messaging::common_figures(&args.messaging, users(args), expected, o.stats);
    messaging::summary("private", &figures, &figures)
}
