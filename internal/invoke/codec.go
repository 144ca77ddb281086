package invoke

import "github.com/treatyhq/treaty/pkg/rawcodec"

// RawCodec passes serialized protobuf bytes through; see package rawcodec.
type RawCodec = rawcodec.Codec
