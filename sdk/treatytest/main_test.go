package treatytest_test

import (
	"os"
	"testing"

	"github.com/treatyhq/treaty/sdk/treatytest"
)

func TestMain(m *testing.M) { os.Exit(treatytest.WrapTestMain(m)) }
