// Names for the kernels' error reports (common.h: Status, Which, Error), so an engine can
// word its own messages. Framework-free; the torch adapter words its errors from these too.
#pragma once

#include "common.h"

namespace sss_ext {

// The argument a logits error refers to: "target_logits", "draft_logits", "ref_logits",
// "logits", or "input" (Which::kNone).
inline const char* tensor_name(Which which) {
  switch (which) {
    case Which::kTarget: return "target_logits";
    case Which::kDraft: return "draft_logits";
    case Which::kRef: return "ref_logits";
    case Which::kLogits: return "logits";
    default: return "input";
  }
}

// A short identifier of a status code ("ok", "bad_draft_token", ...).
inline const char* status_name(Status status) {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kBadDraftToken: return "bad_draft_token";
    case Status::kBadUniform: return "bad_uniform";
    case Status::kNonFiniteLogit: return "non_finite_logit";
    case Status::kEmptyRow: return "empty_row";
    case Status::kNoSupport: return "no_support";
    case Status::kScoreRange: return "score_range";
    case Status::kBadNumDraft: return "bad_num_draft";
  }
  return "unknown_status";
}

}  // namespace sss_ext
