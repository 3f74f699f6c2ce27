//! End to end: `CheckStream`'s requests are read by warden's own decoder
//! (each message a slice of the frame it came in), which must read any
//! framing a client may send as tonic's decoder read it: every answer, in
//! order, and tonic's own errors. Requests are framed by hand, over a real
//! HTTP/2 connection with mTLS.

use crate::support;
use crate::unary::{Answer, call_to, channel, data, dry_run, framed};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use support::Server;
use warden_client::proto::{CheckResponse, Decision, Reason};

const STREAM: &str = "/warden.v1.Warden/CheckStream";

/// Every answer in a stream's body, in order.
fn answers(answer: &Answer) -> Vec<CheckResponse> {
    let mut body = answer.body.clone();
    let mut answers = Vec::new();
    while !body.is_empty() {
        assert_eq!(body[0], 0, "an uncompressed message");
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        answers.push(CheckResponse::decode(&body[5..5 + len]).unwrap());
        body = body.slice(5 + len..);
    }
    answers
}

#[tokio::test]
async fn a_stream_framed_any_way_is_answered_check_by_check_in_order() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let allowed = framed(0, &dry_run(&server).encode_to_vec());
    let mut unknown = dry_run(&server);
    unknown.key_id = "wk_nobody_at_all".into();
    let unknown = framed(0, &unknown.encode_to_vec());
    let junk = framed(0, &[0x1a, 0x7f]);

    // Two messages in one frame, then one split a byte at a time for a
    // while (its prefix split in two), then the last in the frame that
    // finishes it.
    let mut together = BytesMut::new();
    together.put_slice(&unknown);
    together.put_slice(&allowed);
    let mut frames = vec![data(together.freeze()), data(allowed.slice(..2))];
    frames.extend((2..40).map(|i| data(allowed.slice(i..i + 1))));
    let mut rest = BytesMut::from(&allowed[40..]);
    rest.put_slice(&junk);
    frames.push(data(rest.freeze()));
    frames.push(data(Bytes::new()));

    let answer = call_to(&mut channel, STREAM, frames, &[]).await;
    assert_eq!(answer.grpc_status(), "0", "{answer:?}");
    let reasons: Vec<Reason> = answers(&answer).iter().map(|a| a.reason()).collect();
    assert_eq!(
        reasons,
        [
            Reason::Unauthenticated,
            Reason::Ok,
            Reason::Ok,
            Reason::Malformed
        ]
    );
    assert_eq!(answers(&answer)[1].decision(), Decision::Allow);
}

#[tokio::test]
async fn a_stream_that_goes_wrong_ends_with_tonics_error_after_the_answers_before_it() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let request = dry_run(&server).encode_to_vec();
    let allowed = framed(0, &request);
    let ends = |answer: &Answer, status: &str, message: &str| {
        assert_eq!(answer.grpc_status(), status, "{answer:?}");
        assert_eq!(answer.grpc_message(), message);
        let answers = answers(answer);
        assert_eq!(answers.len(), 1, "the answer before it: {answers:?}");
        assert_eq!(answers[0].decision(), Decision::Allow);
    };

    // A compression flag that is neither 0 nor 1.
    let flagged = vec![data(allowed.clone()), data(framed(2, &request))];
    ends(
        &call_to(&mut channel, STREAM, flagged, &[]).await,
        "13",
        "protocol error: received message with invalid compression flag: 2 (valid flags are 0 and 1), while sending request",
    );

    // The compressed flag, with no compression named.
    let compressed = vec![data(allowed.clone()), data(framed(1, &request))];
    ends(
        &call_to(&mut channel, STREAM, compressed, &[]).await,
        "13",
        "protocol error: received message with compressed-flag but no grpc-encoding was specified",
    );

    // A message cut short by the end of the body.
    let cut = vec![
        data(allowed.clone()),
        data(allowed.slice(..allowed.len() - 1)),
    ];
    ends(
        &call_to(&mut channel, STREAM, cut, &[]).await,
        "13",
        "Unexpected EOF decoding stream.",
    );

    // A length past the limit: refused from its prefix.
    let mut huge = BytesMut::new();
    huge.put_u8(0);
    huge.put_u32(u32::MAX);
    let past = vec![data(allowed.clone()), data(huge.freeze())];
    let answer = call_to(&mut channel, STREAM, past, &[]).await;
    assert_eq!(answer.grpc_status(), "11", "OUT_OF_RANGE: {answer:?}");
    assert!(
        answer
            .grpc_message()
            .starts_with("Error, decoded message length too large: found 4294967295 bytes"),
        "{}",
        answer.grpc_message()
    );
    assert_eq!(answers(&answer).len(), 1);

    // A compression warden does not accept: refused by tonic, as before.
    let gzip = call_to(
        &mut channel,
        STREAM,
        vec![data(allowed.clone())],
        &[("grpc-encoding", "gzip")],
    )
    .await;
    assert_eq!(gzip.grpc_status(), "12", "UNIMPLEMENTED: {gzip:?}");
    assert!(gzip.body.is_empty());

    // The connection still answers a stream after all that.
    let fine = call_to(&mut channel, STREAM, vec![data(allowed)], &[]).await;
    assert_eq!(fine.grpc_status(), "0");
    assert_eq!(answers(&fine).len(), 1);
}
