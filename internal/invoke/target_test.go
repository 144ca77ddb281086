package invoke_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/invoke"
)

func TestParseTarget(t *testing.T) {
	t.Parallel()

	good := []struct {
		uri      string
		addrs    []string
		method   string
		endpoint string
	}{
		{"grpc://127.0.0.1:50051/pkg.Svc/Do", []string{"127.0.0.1:50051"}, "/pkg.Svc/Do", "127.0.0.1:50051"},
		{"grpc://flight:9000/travel.flight.v1.FlightService/Reserve", []string{"flight:9000"},
			"/travel.flight.v1.FlightService/Reserve", "flight:9000"},
		{"grpc://b:2,a:1/pkg.Svc/Do", []string{"b:2", "a:1"}, "/pkg.Svc/Do", "a:1,b:2"},
		{"grpc://[::1]:443/grpc.health.v1.Health/Check", []string{"[::1]:443"}, "/grpc.health.v1.Health/Check", "[::1]:443"},
		{"grpc://h:65535/p.S/M", []string{"h:65535"}, "/p.S/M", "h:65535"},
		{"grpc://h:1/p.S/M", []string{"h:1"}, "/p.S/M", "h:1"},
		{"grpc://h:007/p.S/M", []string{"h:7"}, "/p.S/M", "h:7"},
		{"grpc://h:80/Greeter/SayHello", []string{"h:80"}, "/Greeter/SayHello", "h:80"}, // package-less service is legal protobuf
		{"grpc://h:80/p_1.S_2/M_3", []string{"h:80"}, "/p_1.S_2/M_3", "h:80"},
	}
	for _, tc := range good {
		t.Run("good "+tc.uri, func(t *testing.T) {
			t.Parallel()
			got, err := invoke.ParseTarget(tc.uri)
			require.NoError(t, err)
			require.Equal(t, tc.addrs, got.Addrs)
			require.Equal(t, tc.method, got.Method)
			require.Equal(t, tc.endpoint, got.Endpoint())
		})
	}

	long := "grpc://h:1/p.S/" + strings.Repeat("M", invoke.MaxTargetLen)
	bad := []struct {
		name string
		uri  string
		want string // substring of the error
	}{
		{"empty", "", "missing scheme"},
		{"missing scheme", "127.0.0.1:1/p.S/M", "missing scheme"},
		{"http scheme", "http://h:1/p.S/M", `scheme "http" not supported`},
		{"upper-case scheme", "GRPC://h:1/p.S/M", `scheme "GRPC" not supported`},
		{"no address", "grpc:///p.S/M", "no address"},
		{"no port", "grpc://h/p.S/M", "want host:port"},
		{"empty port", "grpc://h:/p.S/M", "no port"},
		{"no host", "grpc://:80/p.S/M", "no host"},
		{"port 0", "grpc://h:0/p.S/M", "port 0 out of range 1..65535"},
		{"port 70000", "grpc://h:70000/p.S/M", "port 70000 out of range 1..65535"},
		{"port not numeric", "grpc://h:http/p.S/M", `port "http" is not a number`},
		{"signed port", "grpc://h:+80/p.S/M", "is not a number"},
		{"empty address in list", "grpc://a:1,,b:2/p.S/M", "empty, want host:port"},
		{"duplicate address", "grpc://a:1,a:1/p.S/M", "listed twice"},
		{"userinfo", "grpc://u@h:1/p.S/M", "want a DNS name or IP address"},
		{"no method", "grpc://h:1", "no method"},
		{"no method after slash", "grpc://h:1/", "no method"},
		{"method without service", "grpc://h:1/Foo", "method must be package.Service/Method"},
		{"empty method", "grpc://h:1/p.S/", "method must be package.Service/Method"},
		{"empty service", "grpc://h:1//M", "method must be package.Service/Method"},
		{"extra segment", "grpc://h:1/p.S/M/x", "method must be package.Service/Method"},
		{"empty package part", "grpc://h:1/p..S/M", "method must be package.Service/Method"},
		{"bad identifier", "grpc://h:1/p.S/Do-It", "method must be package.Service/Method"},
		{"digit first", "grpc://h:1/p.S/1M", "method must be package.Service/Method"},
		{"query", "grpc://h:1/p.S/M?x=1", "query and fragment not supported"},
		{"over the length limit", long, "limit 512"},
	}
	for _, tc := range bad {
		t.Run("bad "+tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := invoke.ParseTarget(tc.uri)
			require.Error(t, err)
			require.ErrorIs(t, err, invoke.ErrInvalidTarget)
			require.Contains(t, err.Error(), tc.want)
			if len(tc.uri) <= invoke.MaxTargetLen {
				require.Contains(t, err.Error(), `target "`+tc.uri+`"`, "the error names the target")
			} else {
				require.Less(t, len(err.Error()), 200, "an over-long target is not echoed whole")
			}
		})
	}
}

func TestTargetString(t *testing.T) {
	t.Parallel()
	const uri = "grpc://b:2,a:1/pkg.Svc/Do"
	got, err := invoke.ParseTarget(uri)
	require.NoError(t, err)
	require.Equal(t, uri, got.String())
}

// FuzzParseTarget checks that ParseTarget never panics and that what it accepts round-trips.
func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"grpc://h:1/p.S/M", "grpc://a:1,b:2/p.S/M", "grpc://[::1]:1/S/M", "http://x", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		got, err := invoke.ParseTarget(uri)
		if err != nil {
			require.ErrorIs(t, err, invoke.ErrInvalidTarget)
			return
		}
		again, err := invoke.ParseTarget(got.String())
		require.NoError(t, err)
		require.Equal(t, got, again)
	})
}
