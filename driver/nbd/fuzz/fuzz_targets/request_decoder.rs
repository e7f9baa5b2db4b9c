//! Arbitrary bytes through every decoder, read as a stream of options and as a stream of
//! requests; the decoders must never panic and must never claim more bytes than they were
//! given.

#![no_main]

use blockgate_nbd::wire::{self, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_client_flags(data);

    let mut rest = data;
    loop {
        match wire::decode_option(rest, wire::MAX_OPTION_PAYLOAD) {
            Ok(Decoded::Complete { value, consumed }) => {
                assert!(consumed >= wire::OPTION_HEADER_LEN && consumed <= rest.len());
                if let Ok(wire::ClientOption::Info(query) | wire::ClientOption::Go(query)) =
                    &value.parsed
                {
                    assert!(query.name.len() <= wire::MAX_STRING_LEN);
                }
                rest = &rest[consumed..];
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > rest.len());
                break;
            }
            Err(error) => {
                if let Some(skip) = error.skip_len() {
                    assert!(skip > u64::from(wire::MAX_OPTION_PAYLOAD));
                }
                break;
            }
        }
    }

    let mut rest = data;
    while let Ok(Some(frame)) = wire::decode_request(rest) {
        if let Ok(request) = frame.request {
            assert_eq!(request.command.to_wire(), frame.header.command);
            assert_eq!(
                request.flags.bits() & !request.command.applicable_flags(),
                0
            );
        }
        let Ok(payload) = usize::try_from(frame.header.payload_len()) else {
            break;
        };
        let Some(next) = rest.get(wire::REQUEST_HEADER_LEN + payload..) else {
            break;
        };
        rest = next;
    }

    for option in [
        wire::NBD_OPT_EXPORT_NAME,
        wire::NBD_OPT_ABORT,
        wire::NBD_OPT_LIST,
        wire::NBD_OPT_INFO,
        wire::NBD_OPT_GO,
    ] {
        let _ = wire::parse_option(option, data);
    }
});
