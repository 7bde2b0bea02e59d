# A tiny Swin Mask R-CNN for the embedded shapes dataset (qwt/data/det_shapes.py, 128x128 images):
# 3 Swin stages (32/64/128 channels, window 4), FPN with 64 channels, anchors of 16-64 px, a small
# box head (128-d fcs) and mask head (2 convs). mmdet 3 config syntax; built by qwt/models/mmdet_zoo.py.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
num_classes = 4
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True, type='SwinTransformer', pretrain_img_size=128, embed_dims=32, depths=[2, 2, 2],
        num_heads=[1, 2, 4], window_size=4, mlp_ratio=4, strides=(4, 2, 2), qkv_bias=True, qk_scale=None,
        drop_rate=0., attn_drop_rate=0., drop_path_rate=0.05, patch_norm=True, out_indices=(0, 1, 2),
        with_cp=False, convert_weights=False, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=64, num_outs=4),
    rpn_head=dict(
        in_channels=64, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', scales=[4], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64, featmap_strides=[4, 8, 16, 32], finest_scale=28),
        bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=64, featmap_strides=[4, 8, 16, 32], finest_scale=28),
        mask_head=dict(num_convs=2, in_channels=64, conv_out_channels=64, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=600, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=50)))
