package invoke_test

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"

	"github.com/treatyhq/treaty/internal/invoke"
)

func TestRawCodec(t *testing.T) {
	t.Parallel()
	var c invoke.RawCodec
	require.Equal(t, "proto", c.Name(), "the wire content-type must be application/grpc+proto")

	in := []byte{0x0a, 0x03, 'a', 'b', 'c'}
	for _, v := range []any{in, &in} {
		out, err := c.Marshal(v)
		require.NoError(t, err)
		require.Equal(t, in, out.Materialize())
	}

	var got []byte
	require.NoError(t, c.Unmarshal(mem.BufferSlice{mem.SliceBuffer("ab"), mem.SliceBuffer("cd")}, &got))
	require.Equal(t, []byte("abcd"), got)

	_, err := c.Marshal("a string")
	require.ErrorContains(t, err, "cannot marshal string, want []byte")
	_, err = c.Marshal((*[]byte)(nil))
	require.Error(t, err)
	require.ErrorContains(t, c.Unmarshal(nil, got), "want a non-nil *[]byte")
	require.ErrorContains(t, c.Unmarshal(nil, (*[]byte)(nil)), "want a non-nil *[]byte")
}

// TestRawCodecNotRegistered guards the process's real proto codec: the raw codec is used per
// call only, so using the invoker must leave the registry as it was.
func TestRawCodecNotRegistered(t *testing.T) {
	t.Parallel()
	registered := encoding.GetCodecV2("proto")
	require.NotNil(t, registered)
	_, isRaw := registered.(invoke.RawCodec)
	require.False(t, isRaw, "the global proto codec must not be replaced")
}
