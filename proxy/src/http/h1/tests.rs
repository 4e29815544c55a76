use super::*;

fn request(text: &[u8]) -> Result<Option<(RequestHead, usize)>, H1Error> {
    parse_request(text, &Limits::default())
}

fn refused(text: &[u8]) -> H1Error {
    match request(text) {
        Err(e) => e,
        other => panic!("accepted {:?}: {other:?}", String::from_utf8_lossy(text)),
    }
}

fn head(text: &[u8]) -> RequestHead {
    request(text).unwrap().expect("incomplete").0
}

#[test]
fn requests_are_framed_by_length_chunked_or_nothing() {
    let h = head(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(h.framing, Framing::Length(5));
    assert!(h.keep_alive);
    let h = head(b"POST /a HTTP/1.1\r\nTransfer-Encoding:  Chunked \r\n\r\n");
    assert_eq!(h.framing, Framing::Chunked);
    assert_eq!(head(b"GET / HTTP/1.1\r\n\r\n").framing, Framing::Empty);
    assert_eq!(
        head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").framing,
        Framing::Empty
    );
    // Repeated, equal lengths are one length (RFC 9110 §8.6).
    assert_eq!(
        head(b"POST / HTTP/1.1\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n").framing,
        Framing::Length(7)
    );
    assert_eq!(request(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
}

/// The request smuggling vectors: every way two parsers could disagree on where a request
/// ends is refused, with the status the proxy answers.
#[test]
fn smuggling_vectors_are_refused() {
    let cases: &[(&[u8], H1Error, u16)] = &[
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            H1Error::LengthAndTransferEncoding,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            H1Error::LengthAndTransferEncoding,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            H1Error::BadContentLength,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            H1Error::BadContentLength,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            H1Error::BadContentLength,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            H1Error::BadContentLength,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            H1Error::BadContentLength,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            H1Error::BadContentLength,
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            H1Error::UnsupportedTransferEncoding,
            501,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            H1Error::UnsupportedTransferEncoding,
            501,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            H1Error::UnsupportedTransferEncoding,
            501,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            H1Error::UnsupportedTransferEncoding,
            501,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked;q=1\r\n\r\n",
            H1Error::UnsupportedTransferEncoding,
            501,
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            H1Error::TransferEncodingInHttp10,
            400,
        ),
    ];
    for (text, error, status) in cases {
        let got = refused(text);
        assert_eq!(&got, error, "{:?}", String::from_utf8_lossy(text));
        assert_eq!(got.status(), *status);
    }
}

#[test]
fn malformed_heads_are_refused() {
    for text in [
        // obs-fold (a continuation line).
        &b"GET / HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n"[..],
        // CR/LF injection: a bare CR inside a value.
        b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
        // Whitespace between the name and the colon.
        b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"G@T / HTTP/1.1\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
    ] {
        let e = refused(text);
        assert_eq!(e.status(), 400, "{e}: {:?}", String::from_utf8_lossy(text));
    }
}

#[test]
fn oversized_heads_are_refused_with_431() {
    let limits = Limits {
        max_head: 1024,
        max_headers: 8,
        max_chunk_meta: 64,
    };
    let mut long = b"GET /".to_vec();
    long.extend(std::iter::repeat_n(b'a', 2000));
    assert_eq!(parse_request(&long, &limits), Err(H1Error::HeadTooLarge));
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..9 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let e = parse_request(&many, &limits).unwrap_err();
    assert_eq!((e.clone(), e.status()), (H1Error::TooManyHeaders, 431));
}

#[test]
fn connection_semantics() {
    assert!(!head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
    assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    assert!(
        head(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
            .expect_continue
    );
    let ws = head(
        b"GET /chat HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(ws.upgrade);
    assert!(!head(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
}

#[test]
fn responses_follow_rfc_9112_framing() {
    let limits = Limits::default();
    let parse =
        |text: &[u8], method: &str| parse_response(text, method, &limits).unwrap().unwrap().0;
    assert_eq!(
        parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "GET").framing,
        Framing::Length(3)
    );
    assert_eq!(
        parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD").framing,
        Framing::Empty
    );
    assert_eq!(
        parse(b"HTTP/1.1 204 No Content\r\n\r\n", "GET").framing,
        Framing::Empty
    );
    assert_eq!(
        parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            "GET"
        )
        .framing,
        Framing::Empty
    );
    assert_eq!(
        parse(b"HTTP/1.1 100 Continue\r\n\r\n", "PUT").framing,
        Framing::Empty
    );
    assert_eq!(
        parse(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "GET"
        )
        .framing,
        Framing::Tunnel
    );
    assert_eq!(
        parse(b"HTTP/1.1 200 Connection established\r\n\r\n", "CONNECT").framing,
        Framing::Tunnel
    );
    assert_eq!(
        parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET"
        )
        .framing,
        Framing::Chunked
    );
    // Found by fuzzing: three digits below 100 are not a status.
    assert_eq!(
        parse_response(b"HTTP/1.1 002 x\r\n\r\n", "GET", &limits),
        Err(H1Error::Malformed("status"))
    );
    let until_close = parse(b"HTTP/1.1 200 OK\r\n\r\n", "GET");
    assert_eq!(until_close.framing, Framing::UntilClose);
    assert!(!until_close.keep_alive);
    assert_eq!(
        parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET",
            &limits
        ),
        Err(H1Error::LengthAndTransferEncoding)
    );
}

#[test]
fn heads_round_trip_with_header_case_kept() {
    let text = b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nX-MiXeD-Case: V\r\ncontent-length: 2\r\n\r\n";
    let (h, n) = request(text).unwrap().unwrap();
    assert_eq!(n, text.len());
    let mut out = Vec::new();
    encode_request_head(&h, &mut out);
    assert_eq!(out, text);
    let (r, _) = parse_response(
        b"HTTP/1.1 404 Not Here\r\nX-Y: z\r\n\r\n",
        "GET",
        &Limits::default(),
    )
    .unwrap()
    .unwrap();
    let mut out = Vec::new();
    encode_response_head(&r, &mut out);
    assert_eq!(out, b"HTTP/1.1 404 Not Here\r\nX-Y: z\r\n\r\n");
}

#[test]
fn hop_by_hop_headers_are_stripped() {
    let mut h = head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: b\r\nUpgrade: h2c\r\nX-Kept: 2\r\n\r\n",
    )
    .headers;
    strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.iter().map(|h| &*h.name).collect();
    assert_eq!(names, ["Host", "X-Kept"]);
}

fn scan_all(body: &[u8]) -> Result<(Vec<u8>, usize), H1Error> {
    let mut chunked = Chunked::new(&Limits::default());
    let s = chunked.scan(body)?;
    assert!(s.done, "incomplete");
    let data = s
        .data
        .iter()
        .flat_map(|r| body[r.clone()].to_vec())
        .collect();
    Ok((data, s.consumed))
}

#[test]
fn chunked_bodies_are_scanned_to_their_exact_end() {
    let body = b"5\r\nhello\r\n6;name=val\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nGET /next";
    let (data, consumed) = scan_all(body).unwrap();
    assert_eq!(data, b"hello world");
    assert_eq!(&body[consumed..], b"GET /next");
    // Byte by byte gives the same.
    let mut chunked = Chunked::new(&Limits::default());
    let mut data = Vec::new();
    let mut consumed = 0;
    for (i, b) in body.iter().enumerate() {
        if chunked.is_done() {
            break;
        }
        let s = chunked.scan(std::slice::from_ref(b)).unwrap();
        for r in s.data {
            data.extend_from_slice(&body[i + r.start..i + r.end]);
        }
        consumed += s.consumed;
    }
    assert_eq!(
        (data.as_slice(), consumed),
        (&b"hello world"[..], body.len() - 9)
    );
    assert_eq!(
        scan_all(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap().0,
        b"0123456789"
    );
}

#[test]
fn bad_chunks_are_refused() {
    for body in [
        &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF after the size
        b"5\r\nhello\n0\r\n\r\n",      // bare LF after data
        b"5\r\nhelloX\r\n0\r\n\r\n",   // more data than the size says
        b"x\r\nhello\r\n0\r\n\r\n",    // not hex
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"\r\n",                           // empty size
        b"11111111111111111\r\n",          // 17 hex digits: overflow
        b"5;a\x01b\r\nhello\r\n0\r\n\r\n", // control character in an extension
        b"0\r\nX: y\n\r\n",                // bare LF in trailers
        b"5\rhello",                       // CR without LF
    ] {
        let mut chunked = Chunked::new(&Limits::default());
        let result = chunked.scan(body);
        assert!(
            matches!(result, Err(H1Error::BadChunk(_))),
            "{:?}: {result:?}",
            String::from_utf8_lossy(body)
        );
    }
    // Extensions and trailers are bounded.
    let mut long = b"1;".to_vec();
    long.extend(std::iter::repeat_n(b'e', 10_000));
    assert!(Chunked::new(&Limits::default()).scan(&long).is_err());
}
