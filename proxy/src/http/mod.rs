//! HTTP: the L7 stage that follows detection. So far the HTTP/1 message framing ([`h1`]),
//! pure functions over the connection's owned buffers, ready for the request path that issue 7
//! builds on top (routing, retries, pools); nothing on the data path calls it yet.

pub mod h1;
