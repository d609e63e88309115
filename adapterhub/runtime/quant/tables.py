"""The numbers of the 4-bit formats, defined once: codebooks, block sizes, the double-quant map.

Hardcoded as IEEE float32 hex words, because regenerating them from their formulas is not bit-exact
(docs/semantics.md §1.1, §2.2); each table is checked against its SHA-256 when this module loads.
The NumPy reference (reference/) carries its own copies as the spec; tests compare the two.
The C and CUDA kernels embed the NF4 codebook too; their bit-exactness tests pin it.
"""

from __future__ import annotations

import hashlib

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # allowed 4-bit block sizes (semantics §1.3)
DEFAULT_BLOCKSIZE = 64  # what transformers + bitsandbytes use for QLoRA (semantics §1.3, §3.2)
NESTED_BLOCKSIZE = 256  # double quantization's block of absmax values (semantics §2.1)
MIN_DIVISOR = 1e-38  # bitsandbytes divides by absmax.clamp(min=1e-38) (semantics §1.2)


def float32_table(hex_words: str, sha256: str) -> torch.Tensor:
    """Whitespace-separated float32 hex words -> (n,) float32 tensor, checked against its SHA-256."""
    words = [int(h, 16) for h in hex_words.split()]
    table = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32).view(torch.float32)
    if hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest() != sha256:
        raise ImportError("adapterhub.runtime.quant.tables: a hardcoded table does not match its SHA-256")
    return table


# semantics §1.1: the NF4 codebook, index = 4-bit code.
NF4_CODE = float32_table(
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000",
    "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a",
)
# semantics §2.2: the signed 8-bit dynamic map of double quantization (index 127 = 0.0, index 255 = 1.0).
DYNAMIC_CODE = float32_table(
    "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 "
    "bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a "
    "bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 "
    "bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334 "
    "bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d "
    "bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 "
    "bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d "
    "ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 "
    "3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d "
    "3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148 "
    "3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d "
    "3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334 "
    "3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 "
    "3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a "
    "3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333 "
    "3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000",
    "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
)
# semantics §11.1: the FP4 codebook, index = 4-bit code: bit 3 the sign, bits 2..0 a magnitude (both zeros +0.0).
FP4_CODE = float32_table(
    "00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000 "
    "00000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000",
    "b830bcf8857895e5676b8e2ce608a60bb8af9b3ce6270073e9de34814196f09c",
)
