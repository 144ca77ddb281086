// Package grpcauth secures the coordinator's gRPC surfaces: the API it serves and the calls it
// makes to participants.
//
// # Serving
//
// A Guard holds what a server needs: transport security (ServerTLS loads a certificate and key,
// and a client CA for mutual TLS), bearer tokens ("authorization: Bearer TOKEN", each token with
// a name), and a token bucket per client identity (golang.org/x/time/rate). Guard.ServerOptions
// installs them as gRPC server options and interceptors. Health checking and reflection stay
// open: load balancers and grpcurl must work without a token.
//
// The identity of a caller is, in this order, the name of its token ("token:NAME"), the subject
// of its verified client certificate ("cert:SUBJECT"), or its IP address ("ip:ADDR"). Rate limits
// apply per identity: one busy client cannot take the whole coordinator, and a caller over its
// limit is told RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when to come back. Nothing
// waits in a queue. Failed authentications count against the caller's IP address, so guessing
// tokens is rate limited too.
//
// Secrets never reach a log: Token keeps only a digest and its name, and its String, GoString
// and LogValue show the name alone.
//
// # Calling participants
//
// ParticipantTLS decides the transport of each participant endpoint from rules that match
// addresses ("*.payments.svc:443", "10.1.2.*", "*"): a CA, a client certificate for mutual TLS,
// a server name, or plaintext. Its TransportFor method plugs into invoke.Config.TransportFor.
//
// Certificates and keys are re-read when their files change (checked at most once a second, on
// a handshake), so rotating them needs no restart. CA bundles are read at start.
package grpcauth
