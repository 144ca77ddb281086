package engine

import (
	"strings"

	"google.golang.org/grpc/status"
)

// maxNonGRPCText bounds what is kept of an answer from an endpoint that does not speak gRPC
// (a web server, a metadata service): enough to see what answered, too little to carry its
// content back to the client through last_error.
const maxNonGRPCText = 160

// nonGRPCMarkers are the phrases of gRPC's transport errors for an answer that is not gRPC.
var nonGRPCMarkers = []string{"unexpected HTTP status code", "unexpected content-type", "malformed header", "non-gRPC"}

// participantText is what is recorded of a failed call: the error's text, cut to a short form
// when the endpoint did not answer as a gRPC server.
func participantText(err error) string {
	msg := err.Error()
	st, ok := status.FromError(err)
	if !ok {
		return msg
	}
	for _, m := range nonGRPCMarkers {
		if strings.Contains(st.Message(), m) {
			if len(msg) > maxNonGRPCText {
				msg = strings.ToValidUTF8(msg[:maxNonGRPCText], "") + "..."
			}
			return "not a gRPC endpoint: " + msg
		}
	}
	return msg
}
