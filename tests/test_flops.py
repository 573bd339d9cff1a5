"""FLOP accounting against hand-computed answers."""

from sae_lens_scale.flops import dense_routed_flops, flops_matched_topk_width, routed_flops, topk_flops


def test_routed_flops_count_the_router_the_routed_blocks_and_k_decoder_rows() -> None:
    flops = routed_flops(d_in=10, d_sae=120, n_experts=4, n_active_experts=2, k=3)
    assert flops.encoder == 2 * 10 * (4 + 2 * 30)
    assert flops.decoder == 2 * 3 * 10
    assert flops.training_step == 3 * (flops.encoder + flops.decoder)


def test_flops_matched_topk_has_the_routed_encoder_cost() -> None:
    width = flops_matched_topk_width(d_sae=4608, n_experts=32, n_active_experts=2)
    assert width == 32 + 2 * 144
    assert topk_flops(768, width, 32).encoder == routed_flops(768, 4608, 32, 2, 32).encoder


def test_dense_moe_pays_for_every_expert() -> None:
    assert dense_routed_flops(10, 120, 4).encoder == topk_flops(10, 124, 3).encoder
    assert dense_routed_flops(10, 120, 4).decoder == topk_flops(10, 120, 3).decoder
    assert topk_flops(10, 120, 3, sparse_decode=True).decoder == 2 * 3 * 10
