package engine

import (
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// MaxStringBytes bounds any string a client sends (gid, names, filters, targets, reasons) unless
// a field has a tighter limit of its own.
const MaxStringBytes = 4096

// CheckString is the one check every string from a client passes, on every RPC and admin route,
// before it reaches the store: valid UTF-8, no NUL (PostgreSQL text cannot hold one), at most
// max bytes (0 means MaxStringBytes).
func CheckString(field, s string, max int) error {
	if max <= 0 {
		max = MaxStringBytes
	}
	switch {
	case len(s) > max:
		return invalid(field, "is %d bytes, limit %d", len(s), max)
	case !utf8.ValidString(s):
		return invalid(field, "is not valid UTF-8")
	case strings.IndexByte(s, 0) >= 0:
		return invalid(field, "contains a NUL byte")
	}
	return nil
}

// CheckDuration checks that d, when set, is a valid google.protobuf.Duration (seconds and nanos
// within range and of the same sign) before anyone reads it: AsDuration of an invalid value
// gives a number, just not the one the client meant.
func CheckDuration(field string, d *durationpb.Duration) error {
	if d == nil {
		return nil
	}
	if err := d.CheckValid(); err != nil {
		return invalid(field, "is not a valid duration (seconds %d, nanos %d): %v", d.GetSeconds(), d.GetNanos(), err)
	}
	return nil
}

// ValidateSaga runs the checks SubmitSaga makes of a saga spec before anything is written,
// with lim's limits (zero values: the defaults). Errors are *InvalidArgumentError.
func ValidateSaga(spec *treatyv1.SagaSpec, lim Limits) error {
	_, err := planSaga(spec, lim.withDefaults(), RetryDefaults{}.withDefaults())
	return err
}
